"""A failed checkpoint write on a full disk becomes one ENOSPC line; any other failure, even on a
nearly full disk, stays itself (an IndexError in a forward pass is a bug, not a full disk)."""

from __future__ import annotations

import errno

import pytest

from fasttrack.lib import training
from fasttrack.lib.training import disk_full_is_oserror


@pytest.fixture
def nearly_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "FULL_BELOW", 1 << 62)  # every filesystem counts as full


def test_a_torch_write_failure_on_a_full_disk_is_enospc(tmp_path, nearly_full) -> None:
    with pytest.raises(OSError) as info, disk_full_is_oserror(tmp_path, tmp_path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 448 vs 342")
    assert info.value.errno == errno.ENOSPC


def test_a_bug_on_a_nearly_full_disk_is_not_called_disk_full(tmp_path, nearly_full) -> None:
    with pytest.raises(IndexError), disk_full_is_oserror(tmp_path, tmp_path):
        raise IndexError("index out of range in self")


def test_an_enospc_anywhere_in_the_chain_is_disk_full_whatever_the_free_space(tmp_path) -> None:
    with pytest.raises(OSError) as info, disk_full_is_oserror(tmp_path, tmp_path):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("save failed") from e
    assert info.value.errno == errno.ENOSPC
