"""virtio devices over the virtio-mmio transport (OASIS virtio 1.2).

``queue`` is the split virtqueue (section 2.7), ``mmio`` the version-2 MMIO
register layout (section 4.2), ``blk`` the block device (section 5.2), ``rng`` the
entropy device (section 5.4). Wiring, as the Machine does it::

    blk = VirtioBlk("disk.img")
    dev = VirtioMmioTransport(blk, mem, trigger)
    mmio_bus.attach(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, dev, "virtio-blk")

See docs/virtio.md for every register, feature and error case.
"""
from .blk import VirtioBlk
from .mmio import VirtioDevice, VirtioMmioTransport
from .queue import DescriptorChain, VirtQueue, VirtqueueError
from .rng import VirtioRng

__all__ = ["DescriptorChain", "VirtioBlk", "VirtioDevice", "VirtioMmioTransport",
           "VirtioRng", "VirtQueue", "VirtqueueError"]
