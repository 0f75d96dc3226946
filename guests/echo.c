/*
 * echo.c - ELF64 long-mode guest: echo COM1 input until a line "quit".
 *
 * Prints a banner, then writes back every byte it reads (a CR is echoed
 * as CR LF).  CR or LF ends a line; after the line "quit" it prints
 * "bye" and exits 0x38: status 0x71, RAX == 0x38.
 */
#include "runtime/runtime.h"

int main(void)
{
	char line[8];
	unsigned len = 0; /* bytes of the current line, saturating */

	puts("echo: type lines, 'quit' ends\n");
	for (;;) {
		int c = getc();

		putc(c);
		if (c == '\r')
			putc('\n');
		if (c != '\r' && c != '\n') {
			if (len < sizeof(line))
				line[len] = (char)c;
			if (len <= sizeof(line))
				len++;
			continue;
		}
		if (len == 4 && line[0] == 'q' && line[1] == 'u' &&
		    line[2] == 'i' && line[3] == 't')
			break;
		len = 0;
	}
	puts("bye\n");
	return 0x38;
}
