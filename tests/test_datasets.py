"""Reading prepared arrays in batches: from the file behind a memory map, or from memory."""

from __future__ import annotations

import numpy as np

from src.data.arrays import read_batches


def test_read_batches_covers_the_array_in_order_for_maps_slices_and_arrays(tmp_path):
    array = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    for source, expected in ((mapped, array), (mapped[4:], array[4:]), (array[:7], array[:7])):
        batches = list(read_batches(source, 3))
        assert [len(b) for b in batches] == [3] * (len(expected) // 3) + (
            [len(expected) % 3] if len(expected) % 3 else []
        )
        assert np.array_equal(np.concatenate(batches), expected)
