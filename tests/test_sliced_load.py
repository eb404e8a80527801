"""Reading part of a twin file (what `TwinCheckpoint.load(like=)` does on each tensor-parallel
rank): a slice holds only its rows, and with verify the whole tensor's checksum is still checked,
streamed from the file block by block, so damage outside the slice is caught."""

import json
import struct

import pytest
import torch

from twinmerge_ext import TwinCheckpoint, _twin_file

FN = "test"


@pytest.fixture(scope="module")
def twin_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 48, generator=g), "b": torch.randn(64, generator=g)}
    experts = {f"t{i}": {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for i in range(3)}
    twin = TwinCheckpoint.build(base, experts, rank=4)
    path = tmp_path_factory.mktemp("sliced") / "twin.safetensors"
    twin.save(path)
    return str(path), twin


def _rows_of_U(key, shape):
    return (0, 8, 16) if key.endswith("U_cat") else None


def test_a_slice_holds_only_its_rows(twin_file):
    path, twin = twin_file
    _, _, _, tensors, _, _ = _twin_file.read_twin(path, None, True, FN, _rows_of_U)
    U = tensors["lowrank/w/U_cat"]
    assert torch.equal(U, twin.lowrank["w"].U_cat[8:24])
    assert U.untyped_storage().nbytes() == U.numel() * U.element_size()  # not the whole tensor
    assert torch.equal(tensors["lowrank/w/V_cat"], twin.lowrank["w"].V_cat)


def _damaged_copy(path, tmp_path, key, byte):
    """A copy of the file with one byte of tensor `key`'s data flipped."""
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    start = 8 + n + json.loads(data[8:8 + n])[key]["data_offsets"][0]
    data[start + byte] ^= 0x40
    out = tmp_path / "damaged.safetensors"
    out.write_bytes(bytes(data))
    return str(out)


@pytest.mark.parametrize("block", [64 << 20, 100])  # one block, and many (rows of 12 floats)
def test_damage_outside_the_slice_is_caught_with_verify(twin_file, tmp_path, monkeypatch, block):
    path, twin = twin_file
    monkeypatch.setattr(_twin_file, "_STREAM_BYTES", block)
    _twin_file.read_twin(path, None, True, FN, _rows_of_U)  # the intact file reads
    bad = _damaged_copy(path, tmp_path, "lowrank/w/U_cat", 1)  # row 0, outside rows 8..24
    with pytest.raises(ValueError, match="'lowrank/w/U_cat' does not match its checksum"):
        _twin_file.read_twin(bad, None, True, FN, _rows_of_U)
    # Without verify only the slice is read: the damage is not seen, the slice is right.
    _, _, _, tensors, _, _ = _twin_file.read_twin(bad, None, False, FN, _rows_of_U)
    assert torch.equal(tensors["lowrank/w/U_cat"], twin.lowrank["w"].U_cat[8:24])


def test_a_slice_out_of_range_is_refused(twin_file):
    path, _ = twin_file
    with pytest.raises(ValueError, match=r"cannot read rows 60\.\.70 of dimension 0"):
        _twin_file.read_twin(path, None, True, FN,
                             lambda k, s: (0, 60, 10) if k.endswith("U_cat") else None)
