"""The run ledger: run keys, names bound for good, records that survive the process."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.batch.ledger import (
    Ledger,
    init_state_dir,
    output_settings,
    run_key,
)
from pipeline.batch.shard import Shard, parse_shard
from pipeline.config import RunConfig
from pipeline.io.fingerprint import fingerprint
from pipeline.io.staging import published_key


def slide(path, seed, shape=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8))
    return path


def key_of(path, cfg=None, model="m" * 64):
    return run_key(fingerprint(path), model, output_settings(cfg or RunConfig()))


def test_key_follows_content_even_with_size_and_mtime_kept(tmp_path):
    a = slide(tmp_path / "a.tif", 0)
    before = key_of(a)
    assert key_of(a) == before  # deterministic
    st = os.stat(a)
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; mtime put back below
    a.write_bytes(bytes(data))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(a).st_size == st.st_size and os.stat(a).st_mtime_ns == st.st_mtime_ns
    assert key_of(a) != before


def test_key_ignores_speed_settings_but_not_pixel_settings(tmp_path):
    a = slide(tmp_path / "a.tif", 0)
    base = key_of(a, RunConfig())
    fast = RunConfig(workers=2, threads_per_worker=3, batch_size=2, block=2048, device="cpu")
    assert key_of(a, fast) == base
    assert key_of(a, RunConfig(tile=128)) != base
    assert key_of(a, RunConfig(dtype="float32")) != base
    assert key_of(a, RunConfig(), model="n" * 64) != base
    assert run_key(fingerprint(a), "m" * 64, output_settings(RunConfig()), "9.9") != base


def test_mask_file_counts_by_content(tmp_path):
    a = slide(tmp_path / "a.tif", 0)
    mask = slide(tmp_path / "mask.tif", 1, (8, 8))
    first = key_of(a, RunConfig(mask=str(mask)))
    slide(mask, 2, (8, 8))
    assert key_of(a, RunConfig(mask=str(mask))) != first


def test_zarr_input_fingerprint_sees_a_changed_chunk(tmp_path):
    path = tmp_path / "in.zarr"
    arr = zarr.create_array(str(path), shape=(64, 64), chunks=(16, 16), dtype="uint8")
    arr[:] = 1
    first = fingerprint(path)
    assert first.kind == "zarr"
    arr[:16, :16] = 2  # the first chunk file is among the sampled ones
    assert fingerprint(path).sample != first.sample


def test_names_are_bound_once_and_never_taken_over(tmp_path):
    out = tmp_path / "out.zarr"
    init_state_dir(out)
    a = slide(tmp_path / "in" / "slide 1.tif", 0)
    b = slide(tmp_path / "in" / "slide_1.tif", 1)
    assert Ledger(out).load().bind_names([a, b]) == ["slide_1", "slide_1-2"]
    # separate runs, each input alone and in the other order: the same names
    assert Ledger(out).load().bind_names([b]) == ["slide_1-2"]
    assert Ledger(out).load().bind_names([a]) == ["slide_1"]
    # a third input with the same sanitised name, even in another case, gets its own
    c = slide(tmp_path / "other" / "Slide_1.tif", 2)
    assert Ledger(out).load().bind_names([c]) == ["Slide_1-3"]


def test_an_output_of_another_input_from_before_the_ledger_is_not_taken(tmp_path):
    out = tmp_path / "out.zarr"
    init_state_dir(out)
    group = zarr.open_group(str(out / "a"), mode="w")
    group.attrs["pipeline"] = {"input": {"path": str(tmp_path / "elsewhere" / "a.tif")}}
    a = slide(tmp_path / "in" / "a.tif", 0)
    assert Ledger(out).load().bind_names([a]) == ["a-2"]
    mine = zarr.open_group(str(out / "b"), mode="w")
    b = slide(tmp_path / "in" / "b.tif", 1)
    mine.attrs["pipeline"] = {"input": {"path": str(b)}}
    assert Ledger(out).load().bind_names([b]) == ["b"]  # its own earlier output


def test_records_and_history_survive_and_merge_on_read(tmp_path):
    out = tmp_path / "out.zarr"
    init_state_dir(out)
    a = os.path.realpath(slide(tmp_path / "a.tif", 0))
    b = os.path.realpath(slide(tmp_path / "b.tif", 1))
    one, two = Ledger(out).load(), Ledger(out).load()  # two shards writing side by side
    one.start(a, a, "a", "k1", "run1")
    two.start(b, b, "b", "k2", "run2")
    one.finish(a, {"path": a, "state": "done"}, "run1", "k1", published=True)
    two.finish(b, {"path": b, "state": "failed", "reason": "x"}, "run2", "k2", published=False)
    merged = Ledger(out).load()
    assert merged.record(a)["output_key"] == "k1" and merged.record(a)["state"] == "done"
    assert "output_key" not in merged.record(b) and merged.record(b)["state"] == "failed"
    assert [e["path"] for e in merged.entries()] == [a, b]
    assert [e["path"] for e in merged.entries({a})] == [b]
    for i in range(30):
        merged.finish(a, {"path": a, "state": "done"}, f"r{i}", "k1", published=True)
    assert len(Ledger(out).load().record(a)["history"]) == 20


def test_up_to_date_reads_the_key_from_the_published_image(tmp_path):
    out = tmp_path / "out.zarr"
    group = zarr.open_group(str(out / "a"), mode="w")
    group.attrs["pipeline"] = {"run_key": "abc"}
    assert published_key(out / "a") == "abc"
    assert Ledger(out).up_to_date("abc", "a") and not Ledger(out).up_to_date("abd", "a")
    assert not Ledger(out).up_to_date("abc", "missing")


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("2/8", {}, Shard(2, 8)),
        (None, {}, None),
        (None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(1, 4)),
        (
            None,
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            Shard(3, 3),
        ),
        ("1/1", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(1, 1)),
    ],
)
def test_shard_from_option_or_slurm_array(text, env, expected):
    assert parse_shard(text, env) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "1/0"])
def test_bad_shard_is_a_config_error(text):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="shard must be I/N"):
        parse_shard(text, {})


def test_shards_split_inputs_deterministically_and_completely(tmp_path):
    paths = [str(tmp_path / f"s{i}.tif") for i in range(40)]
    shards = [Shard(i, 3) for i in (1, 2, 3)]
    owners = [[s for s in shards if s.owns(p)] for p in paths]
    assert all(len(o) == 1 for o in owners)
    assert all(any(s.owns(p) for p in paths) for s in shards)
    assert [o[0] for o in owners] == [[s for s in shards if s.owns(p)][0] for p in paths]
