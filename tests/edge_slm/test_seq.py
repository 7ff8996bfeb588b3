"""The per-device seq: strictly increasing across clean restarts, crashes and threads."""

from __future__ import annotations

import threading

import pytest

from edge_slm.errors import ConfigError
from edge_slm.seq import SeqCounter


def test_fresh_counter_starts_at_one(tmp_path):
    c = SeqCounter(tmp_path / "state" / "seq")  # creates the state dir
    assert [c.next() for _ in range(3)] == [1, 2, 3]


def test_clean_close_and_reopen_continues_without_gap(tmp_path):
    path = tmp_path / "seq"
    c = SeqCounter(path, block=4)
    first = [c.next() for _ in range(10)]  # crosses two block boundaries
    c.close()
    c2 = SeqCounter(path, block=4)
    second = [c2.next() for _ in range(5)]
    c2.close()
    assert first + second == list(range(1, 16))
    assert SeqCounter(path).next() == 16


def test_close_without_any_next_keeps_the_position(tmp_path):
    path = tmp_path / "seq"
    SeqCounter(path, block=8).close()
    assert SeqCounter(path).next() == 1


@pytest.mark.parametrize("issued", [0, 1, 7, 8, 9, 20])
def test_after_a_crash_the_counter_continues_above_every_issued_value(tmp_path, issued):
    path = tmp_path / "seq"
    c = SeqCounter(path, block=8)
    values = [c.next() for _ in range(issued)]
    del c  # crash: close() never runs, the file holds only the reservation
    c2 = SeqCounter(path, block=8)
    after = [c2.next() for _ in range(3)]
    assert after[0] > max(values, default=0)
    assert after == sorted(set(after)) and after[1] == after[0] + 1
    assert after[0] - max(values, default=0) <= 8 + 1  # the gap is at most one block


def test_repeated_crashes_never_repeat_a_number(tmp_path):
    path = tmp_path / "seq"
    seen: list[int] = []
    for n in (3, 0, 5, 1, 4):
        c = SeqCounter(path, block=4)
        seen += [c.next() for _ in range(n)]
    assert seen == sorted(set(seen))


@pytest.mark.parametrize("content", [b"", b"abc", b"-5", b"12 34", b"1.5", b"\xff\xfe", "\u0663".encode()])
def test_corrupt_seq_file_is_a_config_error(tmp_path, content):
    path = tmp_path / "seq"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        SeqCounter(path)
    assert str(path) in str(err.value)


def test_seq_path_that_is_a_directory_is_a_config_error(tmp_path):
    (tmp_path / "seq").mkdir()
    with pytest.raises(ConfigError):
        SeqCounter(tmp_path / "seq")


def test_state_dir_that_cannot_be_created_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="state_dir"):
        SeqCounter(blocker / "sub" / "seq")


def test_threads_never_get_the_same_number(tmp_path):
    c = SeqCounter(tmp_path / "seq", block=16)  # small block: many reservations race with next()
    per_thread: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def work(out: list[int]) -> None:
        start.wait()
        for _ in range(250):
            out.append(c.next())

    threads = [threading.Thread(target=work, args=(o,)) for o in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [v for out in per_thread for v in out]
    assert sorted(everything) == list(range(1, 2001))
    for out in per_thread:  # each thread sees its own values increase
        assert out == sorted(out)
    c.close()
    assert SeqCounter(tmp_path / "seq").next() == 2001
