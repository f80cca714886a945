"""The prompt cache's bookkeeping (worker/promptcache.py) and its files (worker/cachedisk.py)
without llama: states are opaque bytes here. tests/integration/test_prompt_cache.py runs
them in a real worker."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from llm_residentd.worker import cachedisk
from llm_residentd.worker.promptcache import MIN_REUSE, PromptCache, common_prefix, key_of

IDENTITY = {"format": 1, "model": {"size": 1}, "n_ctx": 512}


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


@pytest.mark.parametrize(("a", "b", "n"), [([], [], 0), ([1, 2, 3], [1, 2, 3], 3),
                                           ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1),
                                           (toks(0, 1000), [*toks(0, 999), 5], 999),
                                           ([7], [8], 0)])
def test_common_prefix_counts_tokens(a, b, n):
    assert common_prefix(key_of(a), key_of(b)) == n


def test_the_longest_prefix_wins_and_restoring_copies():
    c = PromptCache(limit=1000)
    c.put(toks(0, 20), None, b"a" * 100)
    c.put(toks(100, 30), None, b"b" * 100)
    entry, n = c.best([*toks(0, 15), 999], None)
    assert n == 15 and c.state_of(entry) == b"a" * 100
    assert c.best(toks(0, 15), None)[0] is entry  # still there: a restore copies
    assert c.best(toks(0, MIN_REUSE - 1), None) == (None, 0)  # too short to be worth it
    assert c.best(toks(0, 20), "adapter") == (None, 0)  # computed under another adapter


def test_an_entry_that_extends_another_replaces_it_and_a_covered_one_is_not_kept():
    c = PromptCache(limit=1000)
    c.put(toks(0, 20), None, b"a" * 100)
    c.put(toks(0, 40), None, b"b" * 200)  # the next turn of the same conversation
    assert len(c.entries) == 1 and c.bytes == 200
    c.put(toks(0, 30), None, b"c" * 150)  # a prefix of what is held: nothing new
    assert len(c.entries) == 1 and c.covers(toks(0, 30), None)


def test_least_recently_used_states_go_first_and_the_bound_holds():
    c = PromptCache(limit=300)
    for i in range(3):
        c.put(toks(100 * i, 20), None, bytes(100))
    c.state_of(c.best(toks(0, 20), None)[0])  # the oldest is used again
    c.put(toks(500, 20), None, bytes(100))
    assert c.bytes <= 300 and c.best(toks(100, 20), None) == (None, 0)  # the LRU one went
    assert c.best(toks(0, 20), None)[1] == 20
    assert c.fit(150) == (2, 200) and c.bytes == 100 and c.limit == 150
    assert c.counters.evicted == 3
    c.put(toks(900, 20), None, bytes(151))  # larger than the whole bound: not kept
    assert c.best(toks(900, 20), None) == (None, 0)


def test_a_thousand_conversations_stay_within_the_bound():
    c = PromptCache(limit=50_000)
    for i in range(1000):
        c.put(toks(10 * i, 30), None, bytes(1000 + i % 7))
        assert c.bytes <= 50_000
    assert 40 <= len(c.entries) <= 50


def _disk(tmp_path: Path, limit: int = 1 << 20, identity=IDENTITY) -> tuple[cachedisk.Disk, list[str]]:
    warnings: list[str] = []
    return cachedisk.Disk(tmp_path, limit, identity, warnings.append), warnings


def test_entries_pushed_out_of_memory_stay_on_disk_and_come_back(tmp_path):
    disk, warnings = _disk(tmp_path)
    c = PromptCache(limit=150, spill=disk)
    c.put(toks(0, 20), None, b"x" * 100)
    c.put(toks(100, 20), None, b"y" * 100)  # pushes the first out of memory
    assert disk.flush(10) and len(list(tmp_path.glob("*.kvc"))) == 2
    entry, n = c.best(toks(0, 20), None)
    assert n == 20 and entry.state is None and entry.on_disk
    assert c.state_of(entry) == b"x" * 100 and entry.state is not None  # back in memory
    # The next worker finds both.
    again, _ = _disk(tmp_path)
    found = again.load()
    assert sorted(e.n_tokens for e in found) == [20, 20] and warnings == []
    assert {again.read(e) for e in found} == {b"x" * 100, b"y" * 100}


def test_the_disk_bound_holds_and_the_oldest_files_go(tmp_path):
    disk, _ = _disk(tmp_path, limit=3 * 1200)
    c = PromptCache(limit=10_000, spill=disk)
    for i in range(6):
        c.put(toks(100 * i, 20), None, bytes(1000))
    assert disk.flush(10)
    assert disk.bytes <= 3 * 1200 and len(list(tmp_path.glob("*.kvc"))) == len(disk) <= 3


@pytest.mark.parametrize(("key", "value"), [("n_ctx", 1024), ("model", {"size": 2}),
                                            ("llama_cpp", "0.3.99"), ("flash_attn", False)])
def test_files_of_another_identity_are_removed_with_one_warning(tmp_path, key, value):
    """Another context size, model file, llama.cpp build or attention layout: each file is
    removed, and one warning counts them and says what differs."""
    identity = {**IDENTITY, "llama_cpp": "0.3.36", "flash_attn": True}
    disk, _ = _disk(tmp_path, identity=identity)
    c = PromptCache(limit=10_000, spill=disk)
    for i in range(3):
        c.put(toks(100 * i, 20), None, bytes(100))
    assert disk.flush(10)
    other, warnings = _disk(tmp_path, identity={**identity, key: value})
    assert other.load() == [] and list(tmp_path.glob("*.kvc")) == []
    assert len(warnings) == 1 and f"3 made for another {key}" in warnings[0], warnings


def test_a_corrupt_file_is_refused_when_read(tmp_path):
    disk, warnings = _disk(tmp_path)
    c = PromptCache(limit=10_000, spill=disk)
    c.put(toks(0, 20), None, bytes(100))
    assert disk.flush(10)
    (path,) = tmp_path.glob("*.kvc")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    again, warnings = _disk(tmp_path)
    (entry,) = again.load()
    assert again.read(entry) is None and not path.exists()
    assert "checksum" in warnings[0]


def test_a_header_that_lies_is_refused(tmp_path):
    disk, _ = _disk(tmp_path)
    PromptCache(limit=10_000, spill=disk).put(toks(0, 20), None, bytes(100))
    assert disk.flush(10)
    (path,) = tmp_path.glob("*.kvc")
    data = path.read_bytes()
    n = int.from_bytes(data[len(cachedisk.MAGIC):len(cachedisk.MAGIC) + 4], "little")
    start = len(cachedisk.MAGIC) + 4
    header = json.loads(data[start:start + n])
    header["n_tokens"] = 10_000  # more tokens than the file holds
    raw = json.dumps(header).encode()
    path.write_bytes(cachedisk.MAGIC + len(raw).to_bytes(4, "little") + raw + data[start + n:])
    again, warnings = _disk(tmp_path)
    assert again.load() == [] and "truncated" in warnings[0]


def test_a_full_disk_turns_the_disk_cache_off_and_memory_serves_on(tmp_path, monkeypatch):
    disk, warnings = _disk(tmp_path)
    c = PromptCache(limit=10_000, spill=disk)

    def full(self, entry, path, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cachedisk.Disk, "_write", full)
    c.put(toks(0, 20), None, bytes(100))
    assert disk.flush(10)
    assert disk.error and "No space left" in disk.error and len(warnings) == 1
    assert len(disk) == 0 and not c.entries[0].on_disk
    c.put(toks(100, 20), None, bytes(100))  # the disk is off now; memory keeps it
    assert c.best(toks(100, 20), None)[1] == 20 and len(disk) == 0
