"""How many UNet batch elements one call may take (`batch_size: auto`)."""

from __future__ import annotations


def auto_batch_size(total: int, held: int, free: int, latent_pixels: int, itemsize: int) -> tuple[int, str | None]:
    """UNet batch elements per call for `batch_size: auto`, and a note when it is not the device's own.

    Chosen from the memory the device has beside this process's model (`total` - `held`, the same
    for every worker on the same hardware and config), not from what happens to be free at start-up:
    the batch split picks the kernels, so it must not vary between workers or a resumed run
    (CONTRACT: same row, config and hardware, same bytes). Only when other processes hold so much
    that it would not fit (`free` below 80 % of it) does the free memory decide, with a note.
    Activation memory per batch element, measured on SD 2.1-base with SDPA: ~30 KB per latent pixel
    in fp16 at the peak (decoder, 64x64); 30 % of the memory is kept spare.
    """
    per_element = latent_pixels * 15_000 * itemsize

    def fit(memory: int) -> int:
        return int(max(3, min(64, (memory * 0.7) // per_element)))

    own = total - held
    if free >= 0.8 * own:
        return fit(own), None
    n = fit(free)
    note = (f"other processes hold {(own - free) / 2**30:.1f} GiB of this device: {n} batch elements per UNet "
            f"call instead of {fit(own)}, so where groups are split differently the last bits of the output "
            "can differ from a worker with the device to itself") if n != fit(own) else None
    return n, note
