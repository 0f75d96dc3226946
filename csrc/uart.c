/*
 * uart.c - the 16550A UART in C, register for register the same as the Python
 * model in kvmpy/devices/serial.py (which is the specification; read it first).
 *
 * Differences are only in plumbing:
 *  - transmitted bytes collect in tx_buf; Python drains them with
 *    kvmpy_uart_take() (a burst of guest output becomes one host write);
 *  - the interrupt line is driven with KVM_IRQ_LINE on vm_fd when gsi >= 0;
 *  - a mutex serialises the vCPU threads (several may write THR at once) with each
 *    other, with host input and with draining; every entry point takes it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#include "kvmpy_native.h"

/* Register offsets and bits: datasheet names, as in serial.py. */
enum { RBR = 0, THR = 0, DLL = 0, IER = 1, DLM = 1, IIR = 2, FCR = 2, LCR = 3, MCR = 4,
       LSR = 5, MSR = 6, SCR = 7 };
#define IER_RDI 0x01
#define IER_THRI 0x02
#define IER_RLSI 0x04
#define IER_MSI 0x08
#define IER_MASK 0x0F
#define IIR_NO_INT 0x01
#define IIR_MSI 0x00
#define IIR_THRI 0x02
#define IIR_RDI 0x04
#define IIR_RLSI 0x06
#define IIR_FIFO_ENABLED 0xC0
#define FCR_ENABLE_FIFO 0x01
#define FCR_CLEAR_RCVR 0x02
#define FCR_CLEAR_XMIT 0x04
#define FCR_STORED 0xC9
#define LCR_DLAB 0x80
#define MCR_DTR 0x01
#define MCR_RTS 0x02
#define MCR_OUT1 0x04
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10
#define MCR_MASK 0x1F
#define LSR_DR 0x01
#define LSR_OE 0x02
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define MSR_DCTS 0x01
#define MSR_DDSR 0x02
#define MSR_TERI 0x04
#define MSR_DDCD 0x08
#define MSR_CTS 0x10
#define MSR_DSR 0x20
#define MSR_RI 0x40
#define MSR_DCD 0x80
#define HOST_MODEM_LINES (MSR_CTS | MSR_DSR | MSR_DCD)
#define DEFAULT_DIVISOR 12

struct kvmpy_uart {
	pthread_mutex_t lock;
	struct kvmpy_uart_state s;
	uint8_t *rx;			/* ring of rx_cap bytes */
	uint8_t *tx;			/* tx_cap bytes awaiting kvmpy_uart_take() */
	uint32_t tx_cap;
	int vm_fd, gsi;
};

struct kvmpy_uart *kvmpy_uart_new(uint32_t rx_cap, uint32_t tx_cap, int vm_fd, int gsi)
{
	struct kvmpy_uart *u;

	if (rx_cap < 1 || tx_cap < 1)
		return NULL;
	u = calloc(1, sizeof(*u));
	if (!u)
		return NULL;
	u->rx = malloc(rx_cap);
	u->tx = malloc(tx_cap);
	if (!u->rx || !u->tx)
		goto err_free;
	if (pthread_mutex_init(&u->lock, NULL))
		goto err_free;
	u->s.rx_cap = rx_cap;
	u->tx_cap = tx_cap;
	u->s.dll = DEFAULT_DIVISOR;
	u->s.modem = HOST_MODEM_LINES;
	u->vm_fd = vm_fd;
	u->gsi = gsi;
	return u;

err_free:
	free(u->rx);
	free(u->tx);
	free(u);
	return NULL;
}

void kvmpy_uart_free(struct kvmpy_uart *u)
{
	if (!u)
		return;
	pthread_mutex_destroy(&u->lock);
	free(u->rx);
	free(u->tx);
	free(u);
}

static uint8_t rx_front(const struct kvmpy_uart *u)
{
	return u->rx[u->s.rx_head];
}

static void rx_pop(struct kvmpy_uart *u)
{
	u->s.rx_head = (u->s.rx_head + 1) % u->s.rx_cap;
	u->s.rx_count--;
}

static void rx_push(struct kvmpy_uart *u, uint8_t b)
{
	/* callers check rx_count < rx_cap, so the index stays inside rx[] */
	u->rx[(u->s.rx_head + u->s.rx_count) % u->s.rx_cap] = b;
	u->s.rx_count++;
}

static int interrupt_id(const struct kvmpy_uart *u)
{
	uint8_t ier = u->s.ier;

	if ((ier & IER_RLSI) && u->s.lsr_errors)
		return IIR_RLSI;
	if ((ier & IER_RDI) && u->s.rx_count)
		return IIR_RDI;
	if ((ier & IER_THRI) && u->s.thr_pending)
		return IIR_THRI;
	if ((ier & IER_MSI) && u->s.msr_delta)
		return IIR_MSI;
	return IIR_NO_INT;
}

static void update_irq(struct kvmpy_uart *u)
{
	int level = interrupt_id(u) != IIR_NO_INT && (u->s.mcr & MCR_OUT2);

	if (level == u->s.level)
		return;
	u->s.level = level;
	u->s.irq_changes++;
	if (u->gsi >= 0) {
		struct kvm_irq_level irq = { .irq = (uint32_t)u->gsi, .level = (uint32_t)level };

		/* level stays the model's: a failure is counted for Python to see, not retried */
		if (ioctl(u->vm_fd, KVM_IRQ_LINE, &irq) < 0) {
			u->s.irq_errors++;
			u->s.irq_errno = errno;
		}
	}
}

static void update_modem(struct kvmpy_uart *u)
{
	uint8_t m = u->s.mcr, nw, changed;

	if (m & MCR_LOOP)
		nw = ((m & MCR_DTR) ? MSR_DSR : 0) | ((m & MCR_RTS) ? MSR_CTS : 0) |
		     ((m & MCR_OUT1) ? MSR_RI : 0) | ((m & MCR_OUT2) ? MSR_DCD : 0);
	else
		nw = HOST_MODEM_LINES;
	changed = nw ^ u->s.modem;
	if (changed & MSR_CTS)
		u->s.msr_delta |= MSR_DCTS;
	if (changed & MSR_DSR)
		u->s.msr_delta |= MSR_DDSR;
	if ((changed & MSR_RI) && !(nw & MSR_RI))
		u->s.msr_delta |= MSR_TERI;
	if (changed & MSR_DCD)
		u->s.msr_delta |= MSR_DDCD;
	u->s.modem = nw;
}

static uint8_t peek(const struct kvmpy_uart *u, uint32_t off)
{
	int dlab = u->s.lcr & LCR_DLAB;

	switch (off) {
	case RBR:
		return dlab ? u->s.dll : (u->s.rx_count ? rx_front(u) : 0);
	case IER:
		return dlab ? u->s.dlm : u->s.ier;
	case IIR:
		return interrupt_id(u) | ((u->s.fcr & FCR_ENABLE_FIFO) ? IIR_FIFO_ENABLED : 0);
	case LCR:
		return u->s.lcr;
	case MCR:
		return u->s.mcr;
	case LSR:
		return (u->s.rx_count ? LSR_DR : 0) | u->s.lsr_errors | LSR_THRE | LSR_TEMT;
	case MSR:
		return u->s.modem | u->s.msr_delta;
	case SCR:
		return u->s.scr;
	}
	return 0xFF;
}

static uint8_t uart_read(struct kvmpy_uart *u, uint32_t off)
{
	uint8_t v = peek(u, off);

	if (off == RBR && !(u->s.lcr & LCR_DLAB)) {
		if (u->s.rx_count)
			rx_pop(u);
	} else if (off == IIR) {
		if ((v & 0x0F) == IIR_THRI)	/* reading IIR clears a reported THRE */
			u->s.thr_pending = 0;
	} else if (off == LSR) {
		u->s.lsr_errors = 0;
	} else if (off == MSR) {
		u->s.msr_delta = 0;
	} else {
		return v;
	}
	update_irq(u);
	return v;
}

static void transmit(struct kvmpy_uart *u, uint8_t b)
{
	if (u->s.mcr & MCR_LOOP) {
		if (u->s.rx_count < u->s.rx_cap)
			rx_push(u, b);
		else
			u->s.lsr_errors |= LSR_OE;
	} else if (u->s.tx_len < u->tx_cap) {
		u->tx[u->s.tx_len++] = b;
	} else {
		u->s.tx_dropped++;	/* not reached: kvmpy_uart_write/_pio refuse what does not fit */
	}
	u->s.thr_pending = 1;
}

static void write_fcr(struct kvmpy_uart *u, uint8_t v)
{
	if ((v ^ u->s.fcr) & FCR_ENABLE_FIFO)
		v |= FCR_CLEAR_RCVR | FCR_CLEAR_XMIT;
	if ((v & (FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)) && ((v | u->s.fcr) & FCR_ENABLE_FIFO)) {
		if (v & FCR_CLEAR_RCVR)
			u->s.rx_head = u->s.rx_count = 0;
		if (v & FCR_CLEAR_XMIT)
			u->s.thr_pending = 1;
	}
	u->s.fcr = (v & FCR_ENABLE_FIFO) ? (v & FCR_STORED) : 0;
}

static void uart_write(struct kvmpy_uart *u, uint32_t off, uint8_t v)
{
	int dlab = u->s.lcr & LCR_DLAB;

	switch (off) {
	case THR:
		if (dlab) {
			u->s.dll = v;
			return;
		}
		transmit(u, v);
		break;
	case IER:
		if (dlab) {
			u->s.dlm = v;
			return;
		}
		v &= IER_MASK;
		if ((v ^ u->s.ier) & IER_THRI)	/* rising THRI with THR empty re-raises THRE */
			u->s.thr_pending = !!(v & IER_THRI);
		u->s.ier = v;
		break;
	case FCR:
		write_fcr(u, v);
		break;
	case LCR:
		u->s.lcr = v;
		return;
	case MCR:
		u->s.mcr = v & MCR_MASK;
		update_modem(u);
		break;
	case SCR:
		u->s.scr = v;
		return;
	default:			/* LSR, MSR and out of range: ignored */
		return;
	}
	update_irq(u);
}

/* --- locked entry points (Python and the run loop) ------------------------------ */

uint32_t kvmpy_uart_read(struct kvmpy_uart *u, uint32_t off)
{
	uint8_t v;

	pthread_mutex_lock(&u->lock);
	v = uart_read(u, off);
	pthread_mutex_unlock(&u->lock);
	return v;
}

int kvmpy_uart_write(struct kvmpy_uart *u, uint32_t off, uint32_t value)
{
	int full;

	pthread_mutex_lock(&u->lock);
	/* A THR byte with no room to keep it: refuse it whole, so the caller drains and retries
	 * (another vCPU's C loop may have filled the buffer since the caller looked). */
	full = off == THR && !(u->s.lcr & LCR_DLAB) && !(u->s.mcr & MCR_LOOP) && u->s.tx_len >= u->tx_cap;
	if (!full)
		uart_write(u, off, (uint8_t)value);
	pthread_mutex_unlock(&u->lock);
	return !full;
}

uint32_t kvmpy_uart_peek(struct kvmpy_uart *u, uint32_t off)
{
	uint8_t v;

	pthread_mutex_lock(&u->lock);
	v = peek(u, off);
	pthread_mutex_unlock(&u->lock);
	return v;
}

uint32_t kvmpy_uart_feed(struct kvmpy_uart *u, const uint8_t *data, uint32_t len)
{
	uint32_t n, i;

	pthread_mutex_lock(&u->lock);
	n = (u->s.mcr & MCR_LOOP) ? 0 : u->s.rx_cap - u->s.rx_count;
	if (n > len)
		n = len;
	for (i = 0; i < n; i++)
		rx_push(u, data[i]);
	if (n)
		update_irq(u);
	pthread_mutex_unlock(&u->lock);
	return n;
}

uint32_t kvmpy_uart_take(struct kvmpy_uart *u, uint8_t *out, uint32_t cap)
{
	uint32_t n;

	pthread_mutex_lock(&u->lock);
	n = u->s.tx_len < cap ? u->s.tx_len : cap;
	memcpy(out, u->tx, n);
	memmove(u->tx, u->tx + n, u->s.tx_len - n);
	u->s.tx_len -= n;
	pthread_mutex_unlock(&u->lock);
	return n;
}

/*
 * Free output space, read under the lock. Only a snapshot: with several vCPUs, any of
 * them may fill the buffer (and Python drain it) as soon as the lock is released, so
 * this is advice (kvmpy_run's KVMPY_RUN_DRAIN), never permission to write. Whether a
 * THR byte fits is decided under the same lock hold that stores it: kvmpy_uart_write
 * and kvmpy_uart_pio refuse what does not fit, whole.
 */
uint32_t kvmpy_uart_tx_space(struct kvmpy_uart *u)
{
	uint32_t n;

	pthread_mutex_lock(&u->lock);
	n = u->tx_cap - u->s.tx_len;
	pthread_mutex_unlock(&u->lock);
	return n;
}

void kvmpy_uart_get_state(struct kvmpy_uart *u, struct kvmpy_uart_state *out)
{
	pthread_mutex_lock(&u->lock);
	*out = u->s;
	pthread_mutex_unlock(&u->lock);
}

/* The run loop's fast path: serve an I/O exit on the UART's 8 ports. Returns 1 if
 * handled, 0 if Python must handle it (a THR burst larger than the free tx space,
 * checked under the lock that also stores it, so another vCPU cannot fill it between). */
int kvmpy_uart_pio(struct kvmpy_uart *u, uint32_t off, int is_out, uint8_t *data,
		   uint32_t size, uint32_t count)
{
	uint32_t i;

	pthread_mutex_lock(&u->lock);
	if (is_out && off == THR && !(u->s.lcr & LCR_DLAB) && !(u->s.mcr & MCR_LOOP) &&
	    u->tx_cap - u->s.tx_len < count) {
		pthread_mutex_unlock(&u->lock);
		return 0;
	}
	for (i = 0; i < count; i++) {
		uint8_t *item = data + (size_t)i * size;	/* inside the kvm_run page: checked by the caller */

		if (is_out) {
			uart_write(u, off, item[0]);	/* wider accesses act on the low byte */
		} else {
			memset(item, 0, size);
			item[0] = uart_read(u, off);
		}
	}
	pthread_mutex_unlock(&u->lock);
	return 1;
}

/* --- snapshots: registers and the receive FIFO in and out (the output buffer is drained first) */

uint32_t kvmpy_uart_rx_copy(struct kvmpy_uart *u, uint8_t *out, uint32_t cap)
{
	uint32_t i, n;

	pthread_mutex_lock(&u->lock);
	n = u->s.rx_count < cap ? u->s.rx_count : cap;
	for (i = 0; i < n; i++)
		out[i] = u->rx[(u->s.rx_head + i) % u->s.rx_cap];
	pthread_mutex_unlock(&u->lock);
	return n;
}

int kvmpy_uart_set_state(struct kvmpy_uart *u, const struct kvmpy_uart_state *s,
			 const uint8_t *rx, uint32_t n)
{
	uint32_t i;

	if (n > u->s.rx_cap)
		return -EINVAL;
	pthread_mutex_lock(&u->lock);
	u->s.ier = s->ier & IER_MASK;
	u->s.fcr = s->fcr;
	u->s.lcr = s->lcr;
	u->s.mcr = s->mcr & MCR_MASK;
	u->s.scr = s->scr;
	u->s.dll = s->dll;
	u->s.dlm = s->dlm;
	u->s.lsr_errors = s->lsr_errors;
	u->s.msr_delta = s->msr_delta;
	u->s.modem = s->modem;
	u->s.thr_pending = !!s->thr_pending;
	u->s.rx_head = 0;
	u->s.rx_count = 0;
	for (i = 0; i < n; i++)
		rx_push(u, rx[i]);
	update_irq(u);
	pthread_mutex_unlock(&u->lock);
	return 0;
}
