"""Guest images: the bundled micro-VM guests (guests.py), Debian's kernel fetched and
cached (linuxkernel.py) and initramfs archives written without cpio or root (initramfs.py)."""
