"""Streamed gate-training data (pure torch): sources, buckets, the latent cache, prefetch, memory."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from mepg_training_testing import FakeEncoders, ToyDenoiser, make_moe, make_stack, streaming_data, write_image_folder

from mepg_core.gate_training import GateTrainer, GateTrainingConfig, ImageCaptionFolder
from mepg_core.training.buckets import Sizing
from mepg_core.training.distributed import LocalRunner
from mepg_core.training.streaming import DataSourceError, expand_shards, open_source, prefetch

SIZES = ((64, 64), (128, 48), (48, 128))  # three buckets at resolution 128


@pytest.fixture(scope="module")
def stack():
    return make_stack()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), 9, sizes=SIZES, styles=["anime", "photo", ""])


def write_jsonl(folder: Path, path: Path) -> Path:
    lines = []
    for image in sorted(folder.glob("*.png")):
        record = {"image": os.path.relpath(image, path.parent), "caption": image.with_suffix(".txt").read_text()}
        style = image.with_suffix(".style")
        if style.exists() and style.read_text():
            record["style"] = style.read_text()
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")  # a blank line is skipped
    return path


def write_shards(folder: Path, out: Path, per_shard: int = 4) -> list[Path]:
    """WebDataset layout: KEY.png + KEY.txt (caption), styles in KEY.json for odd keys, KEY.style else."""
    out.mkdir(parents=True, exist_ok=True)
    images = sorted(folder.glob("*.png"))
    shards = []
    for number in range(0, len(images), per_shard):
        path = out / f"shard-{number // per_shard:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for image in images[number:number + per_shard]:
                key = image.stem
                members = {f"{key}.png": image.read_bytes(), f"{key}.txt": image.with_suffix(".txt").read_bytes()}
                style = image.with_suffix(".style")
                if style.exists() and style.read_text():
                    if int(key[-1]) % 2:
                        members[f"{key}.json"] = json.dumps({"style": style.read_text()}).encode()
                    else:
                        members[f"{key}.style"] = style.read_bytes()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def samples_of(source, sizing):
    from PIL import Image

    out = []
    for i in range(len(source)):
        with source.open_image(i) as handle, Image.open(handle) as image:
            out.append((sizing.pixels(image), *source.text(i)))
    return out


def test_folder_jsonl_and_tar_shards_give_the_same_samples(folder, tmp_path):
    sizing = Sizing(128)
    reference = ImageCaptionFolder(folder, 128)
    expected = [reference.load(i) for i in range(len(reference))]
    (tmp_path / "sub").mkdir()
    jsonl = write_jsonl(folder, tmp_path / "sub" / "data.jsonl")  # image paths relative to the file
    shards = write_shards(folder, tmp_path / "shards")
    specs = [str(folder), str(jsonl), str(tmp_path / "shards"), str(tmp_path / "shards" / "shard-{000..002}.tar"),
             str(tmp_path / "shards" / "*.tar")]
    for spec in specs:
        source = open_source(spec)
        got = samples_of(source, sizing)
        assert len(got) == len(expected), spec
        for (pixels, caption, style), (want_pixels, want_caption, want_style) in zip(got, expected):
            assert torch.equal(pixels, want_pixels) and caption == want_caption and style == want_style, spec
    assert expand_shards(str(tmp_path / "shards" / "shard-{000..001}.tar")) == [str(p) for p in shards[:2]]


def test_bad_sources_fail_naming_the_file(folder, tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        open_source(tmp_path / "nowhere")
    with pytest.raises(DataSourceError, match=r"tar shard .*shard-000.tar not found \(and 9 more\)"):
        open_source(str(tmp_path / "shard-{000..009}.tar"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\nnot json\n{"caption": "no image"}\n')
    source = open_source(bad)
    with pytest.raises(DataSourceError, match=r"bad.jsonl:1: image file .*a.png not found"):
        source.open_image(0)
    with pytest.raises(DataSourceError, match=r"bad.jsonl:2: not JSON"):
        source.text(1)
    with pytest.raises(DataSourceError, match=r"bad.jsonl:3: needs an 'image' path"):
        source.text(2)
    shard = write_shards(folder, tmp_path / "cut", per_shard=9)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(DataSourceError, match="cut/shard-000.tar"):
        source = open_source(shard)
        for i in range(len(source)):
            source.open_image(i)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "a.png").write_bytes((folder / "img00000.png").read_bytes())
    with pytest.raises(DataSourceError, match="'a.png' has no caption file 'a.txt'"):
        open_source(lonely).text(0)
    assert open_source(lonely, allow_missing_captions=True).text(0) == ("", None)


def test_buckets_match_the_in_memory_folder_reader(folder, tmp_path):
    data, _ = streaming_data(folder, tmp_path / "cache", LocalRunner(), resolution=128)
    reference = ImageCaptionFolder(folder, 128)
    assert {size: len(ids) for size, ids in data.buckets().items()} == reference.sizes()
    assert [data.styles[i] for i in range(len(data))] == [item.style for item in reference.items]
    assert len(data.buckets()) == 3  # batches never mix these


def train_streamed(stack, folder, cache, steps, encoders=None, **kwargs):
    moe = make_moe(stack)
    model = ToyDenoiser(moe)
    data, encoders = streaming_data(folder, cache, LocalRunner(), encoders=encoders, shard_mb=0.01, resolution=128,
                                    **kwargs)
    config = GateTrainingConfig(steps=steps, learning_rate=0.05, batch_size=2, seed=1)
    trainer = GateTrainer(moe, model, data, config, stack=stack, frozen=[model])
    return trainer, data, encoders


def test_epoch_two_reads_the_cache_and_never_calls_the_vae(stack, folder, tmp_path):
    trainer, data, encoders = train_streamed(stack, folder, tmp_path / "cache", steps=1)
    per_epoch = trainer._batches_per_epoch  # 9 images in 3 buckets of 3, batch 2: 6 micro-batches
    assert per_epoch == 6
    calls: list[tuple[int, int, int]] = []
    trainer.config.steps = 3 * per_epoch
    trainer.train(progress=lambda p: calls.append((p.step, encoders.image_calls, encoders.text_calls)))
    assert calls[per_epoch - 1][1:] == (per_epoch, 9)  # epoch 1: one VAE call per micro-batch, each text once
    assert all(c[1:] == (per_epoch, 9) for c in calls[per_epoch:])  # epochs 2 and 3: no encoder call at all
    assert data.cache.missing() == 0 and len(data.cache.files) > 1  # several shards (shard_mb is tiny)

    # A later run on the same cache encodes nothing, and trains on exactly the same numbers as the first
    # (fresh encodings are rounded to the cache dtype before use, so epoch 1 equals every later epoch).
    again, _data, counting = train_streamed(stack, folder, tmp_path / "cache", steps=3 * per_epoch)
    result = again.train()
    assert counting.image_calls == 0 and counting.text_calls == 0
    assert result.loss_history == trainer.loss_history
    # ... and those numbers are the cached (float16) ones: a float32 cache trains on other numbers.
    fresh, _data, _enc = train_streamed(stack, folder, tmp_path / "other-cache", steps=per_epoch,
                                        cache_dtype="float32")
    assert fresh.train().loss_history != trainer.loss_history[:per_epoch]


def test_a_cache_made_for_other_settings_is_refused(stack, folder, tmp_path):
    streaming_data(folder, tmp_path / "cache", LocalRunner(), resolution=64)
    with pytest.raises(ValueError, match="made with resolution = 64, this run has 128"):
        streaming_data(folder, tmp_path / "cache", LocalRunner(), resolution=128)
    with pytest.raises(ValueError, match="made with dtype = 'float16', this run has 'float32'"):
        streaming_data(folder, tmp_path / "cache", LocalRunner(), resolution=64, cache_dtype="float32")


def test_prefetch_stays_a_bounded_number_of_items_ahead():
    fetched, lock = [], threading.Lock()

    def fetch(item):
        with lock:
            fetched.append(item)
        return item * 2

    seen = []
    for value in prefetch(fetch, range(40), workers=3, depth=4):
        seen.append(value)
        with lock:
            ahead = len(fetched) - len(seen)  # read but not yet handed out
        assert ahead <= 4, ahead
    assert seen == [2 * i for i in range(40)]
    with pytest.raises(ZeroDivisionError):  # a reader's error reaches the trainer
        list(prefetch(lambda i: 1 / (i - 3), range(6), workers=2, depth=2))


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_streamed_loader_memory_is_flat_over_ten_times_the_in_memory_budget(tmp_path):
    """The old path held every encoded sample in memory. With a budget of 8 MiB for it and samples of
    ~95 KiB encoded (a 4×32×32 latent and a 77×256 context, float32), 88 fit; here ten times as many are
    streamed through the loader — encoded and cached in epoch 1, read back in epoch 2 — and the
    process's RSS must stay within 5 % of what it was after the first 100."""
    budget, per_sample = 8 * 2**20, (4 * 32 * 32 + 77 * 256) * 4
    count = 10 * (budget // per_sample + 1)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (256, 256), (120, 30, 200)).save(tmp_path / "base.png")
    for i in range(count):  # hard links: one image file, many samples
        os.link(tmp_path / "base.png", images / f"img{i:05d}.png")
        (images / f"img{i:05d}.txt").write_text(f"sample {i}")

    class BigText(FakeEncoders):
        def text(self, caption):
            return torch.randn(77, 256), None

    data, _ = streaming_data(images, tmp_path / "cache", LocalRunner(), encoders=BigText(), resolution=256,
                             cache_dtype="float32", shard_mb=2, workers=2, prefetch=4)
    requests = [[i, i + 1] for i in range(0, count, 2)]
    samples, marks = 0, []
    for _epoch in range(2):
        for batch in data.batches(requests):
            samples += batch["x0"].shape[0]
            del batch
            if samples in (100, count, 2 * count):
                marks.append(rss_bytes())
        data.end_epoch()
    assert data.encoded_images == count and data.cache.missing() == 0
    cached = sum(os.path.getsize(p) for p in (tmp_path / "cache").glob("cache-*.safetensors"))
    assert cached > 10 * budget  # the data really is ten times the old budget
    start, end_one, end_two = marks
    print(f"RSS after 100 samples {start / 2**20:.1f} MiB, after epoch 1 {end_one / 2**20:.1f} MiB, after epoch 2 "
          f"{end_two / 2**20:.1f} MiB; {count} samples, {cached / 2**20:.1f} MiB cached")
    assert max(end_one, end_two) <= 1.05 * start, (start, end_one, end_two, cached)
    assert max(end_one, end_two) - start < 0.2 * cached  # holding a fifth of the data would already fail
