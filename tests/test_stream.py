"""The streaming data path against the tensor-resident one, on small generated image trees: same
pixels, same batches, same training; `auto` streams what exceeds the memory budget; DDP ranks take
disjoint samples; bad files are one line naming them, at startup or mid-epoch, never a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from compress.cli import main
from compress.data.imagefolder import ImageFolder
from compress.data.stream import StreamBundle
from compress.data.transforms import TrainView
from compress.deploy import ModelInfo, Predictor, find_images, load_image
from compress.errors import CompressError
from compress.recipe import load_recipe

CLASSES = ("ants", "bees", "cats")


def make_tree(root: Path, train: int = 24, val: int = 8, seed: int = 0) -> Path:
    """Class-coloured JPEGs of varied, non-square sizes (so resize + center crop matter)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(36, 72, 2))
                base = np.zeros((h, w, 3), np.float32)
                base[..., c] = 150
                img = np.clip(base + rng.normal(60, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


def _both(tree: Path, **kw) -> tuple[StreamBundle, object]:
    streamed = ImageFolder(root=tree, image_size=32, stream=True, workers=2, batch_size=16, **kw).open()
    memory = ImageFolder(root=tree, image_size=32, stream=False, batch_size=16, **kw).open()
    assert isinstance(streamed, StreamBundle) and not memory.streaming
    return streamed, memory


def _by_index(loader, epoch: int) -> dict[int, torch.Tensor]:
    loader.set_epoch(epoch)
    return {int(j): x[k] for x, _, idx in loader.batches() for k, j in enumerate(idx.tolist())}


def test_streaming_gives_the_tensor_paths_pixels_batches_and_statistics(tree):
    streamed, memory = _both(tree)
    assert (streamed.train_size, streamed.test_size) == (memory.train_size, memory.test_size) == (72, 24)
    assert torch.equal(streamed.raw("test", range(24)), memory.raw("test", range(24)))
    assert torch.equal(streamed.raw("train", [5, 40, 70]), memory.raw("train", [5, 40, 70]))
    assert streamed.mean == pytest.approx(memory.mean, abs=2e-3)  # from 72 of 72 images: the same set
    # Without augmentation, the same seed gives the same batches in the same order in both paths.
    a = list(streamed.train_loader(seed=7, augment=False).batches())
    b = list(memory.train_loader(seed=7, augment=False).batches())
    assert len(a) == len(b) == 72 // 16
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    raw = [x for x, _ in streamed.raw_batches("test", 20, 8)]
    assert [len(x) for x in raw] == [8, 8, 4] and raw[0].dtype == torch.uint8


@pytest.mark.parametrize("stream", [False, True])
def test_replayed_views_repeat_exactly_and_fresh_views_do_not(tree, stream):
    kw = {"workers": 2} if stream else {}
    data = ImageFolder(root=tree, image_size=32, stream=stream, batch_size=16, **kw).open()
    replay = data.train_loader(seed=3, views=2)
    e0, e1, e2 = (_by_index(replay, e) for e in (0, 1, 2))
    same = set(e0) & set(e2)
    assert len(same) > 40 and all(torch.equal(e0[j], e2[j]) for j in same)
    assert not any(torch.equal(e0[j], e1[j]) for j in set(e0) & set(e1))
    fresh = data.train_loader(seed=3)
    f0, f1 = _by_index(fresh, 0), _by_index(fresh, 1)
    assert not any(torch.equal(f0[j], f1[j]) for j in set(f0) & set(f1))
    # the same seed in a new loader (a resumed run, other workers) draws the same fresh views
    again = _by_index(data.train_loader(seed=3), 1)
    assert all(torch.equal(f1[j], again[j]) for j in f1)


def test_the_training_view_is_torchvisions_transform_seeded_per_image():
    from torchvision.transforms import v2

    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    ours = TrainView("random_resized", 32, 4, (0.08, 1.0), True, None)
    theirs = v2.Compose([v2.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    for key in range(16):
        torch.manual_seed(key)
        assert torch.equal(ours(img, key), theirs(img))
    pad = TrainView("pad", 32, 4, (1.0, 1.0), False, None, (120, 110, 100))
    padded = pad(torch.zeros(3, 32, 32, dtype=torch.uint8), 5)
    border = torch.cat([padded[:, 0], padded[:, -1], padded[:, :, 0], padded[:, :, -1]], 1)
    assert {tuple(c) for c in border.T.tolist()} <= {(120, 110, 100), (0, 0, 0)}  # the mean colour pads


@pytest.mark.parametrize("auto_augment", ["trivial", "randaugment"])
def test_auto_augment_is_seeded_per_image_and_leaves_the_global_generator_alone(auto_augment):
    img = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    plain = TrainView("random_resized", 32, 4, (0.5, 1.0), True, None)
    augmented = TrainView("random_resized", 32, 4, (0.5, 1.0), True, auto_augment)
    state = torch.random.get_rng_state()
    views = [augmented(img, key) for key in range(12)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.uint8 for v in views)
    assert all(torch.equal(v, augmented(img, key)) for key, v in enumerate(views))  # same key, same view
    assert sum(not torch.equal(v, plain(img, key)) for key, v in enumerate(views)) >= 6  # the ops change pixels


def test_the_exported_model_says_how_to_resize_and_a_deployer_gets_the_reports_top1(tree, tmp_path):
    recipe = {
        "name": "stream",
        "device": "cpu",
        "data": {"name": "imagefolder", "root": str(tree), "image_size": 32, "stream": True, "workers": 2,
                 "batch_size": 16, "eval_batch_size": 10, "augment": False},
        "student": {"model": "resnet20"},
        "stages": [{"kind": "train", "epochs": 1, "optim": {"lr": 0.05, "precision": "fp32"}}, {"kind": "export"}],
        "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    onnx_row = next(a for a in report["artifacts"] if a["name"] == "model.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "run" / "model.onnx")).metadata_props}
    assert props["resize_shorter"] == "36" and json.loads(props["image_size"]) == [32, 32]  # floor(32 / 0.875)
    # A deployer: files -> resize shorter side + center crop as the metadata says -> ORT.
    predictor = Predictor(tmp_path / "run" / "model.onnx")
    files = find_images([tree / "val"])
    labels = np.array([CLASSES.index(f.parent.name) for f in files])
    images = np.stack([load_image(f, predictor.info) for f in files])
    predicted = predictor.logits(images).argmax(1)
    assert float((predicted == labels).mean()) == pytest.approx(onnx_row["accuracy"], abs=1e-9)
    # ... and so does the fifteen-line example a deployer copies (onnxruntime + Pillow only)
    script = Path(__file__).resolve().parent.parent / "examples" / "deploy_onnxruntime.py"
    argv = [sys.executable, str(script), str(tmp_path / "run" / "model.onnx"), *map(str, files)]
    lines = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    assert [ln.split(": ")[1].split(" ")[0] for ln in lines] == [CLASSES[i] for i in predicted]
    # ... and the tensor-resident path trains the same model from the same batches: the same top-1
    recipe["data"] |= {"stream": False}
    del recipe["data"]["workers"]
    recipe["stages"] = recipe["stages"][:1]
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "mem"), "--quiet"]) == 0
    mem = json.loads((tmp_path / "mem" / "report.json").read_text())
    assert mem["artifacts"][0]["accuracy"] == report["artifacts"][0]["accuracy"]
    for run in ("run", "mem"):  # what compress bench/export/--resume read back: every field, defaults too
        load_recipe(tmp_path / run / "recipe.resolved.yaml", user_code=False)


def test_eval_view_is_the_deployers_view_on_a_non_square_image(tree):
    data = ImageFolder(root=tree, image_size=32, stream=True, workers=0).open()
    info = ModelInfo(CLASSES, 3, 32, 32, "nhwc", "uint8", True, (0.5,) * 3, (0.2,) * 3, resize_shorter=36)
    path = data.test.path(3)
    assert Image.open(path).size[0] != Image.open(path).size[1]
    assert np.array_equal(data.raw("test", [3])[0].permute(1, 2, 0).numpy(), load_image(path, info))
    square = Image.open(path).convert("RGB").resize((32, 32))
    square.save(Path(data.test.path(3)).parent / "square.png")
    as_is = load_image(Path(data.test.path(3)).parent / "square.png", info, resize=False)  # --no-resize
    assert np.array_equal(as_is, np.asarray(square))
    (Path(data.test.path(3)).parent / "square.png").unlink()


def test_a_16_bit_png_decodes_to_8_bits_and_a_bad_one_is_named(tmp_path):
    from compress.data.transforms import decode

    deep = (np.arange(40 * 30 * 3).reshape(40, 30, 3) * 37 % 65536).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep[..., 0]).save(path)  # mode I;16
    img = decode(str(path))
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 30)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    with pytest.raises(CompressError, match=r"^data.root: .*bad.jpg: cannot decode the image \(") as err:
        decode(str(bad))
    assert ".cpp" not in str(err.value)


def test_auto_streams_what_exceeds_the_memory_budget_and_says_so(tree, monkeypatch, caplog):
    assert not ImageFolder(root=tree, image_size=32).open().streaming  # 96 images of 3 KB fit
    monkeypatch.setenv("COMPRESS_DATA_MAX_GB", "0.0001")  # 107 KB < 96 x 3 x 32 x 32 = 295 KB
    with caplog.at_level("WARNING", logger="compress.data"):
        data = ImageFolder(root=tree, image_size=32, workers=0).open()
    assert data.streaming and "over the 0.0 GiB memory budget (COMPRESS_DATA_MAX_GB): streaming" in caplog.text
    with pytest.raises(CompressError, match=r"^data.stream: 96 images at 32x32 would take .* set stream: true"):
        ImageFolder(root=tree, image_size=32, stream=False).open()  # refused before decoding anything
    with pytest.raises(ValueError, match="workers: only streaming uses worker processes"):
        ImageFolder(root=tree, stream=False, workers=2)


def test_an_archive_that_would_not_fit_is_refused_before_decoding(tree, tmp_path, monkeypatch):
    import tarfile

    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="tree")
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESS_DATA_MAX_GB", "0.0001")
    with pytest.raises(CompressError, match=r"^data.stream: 96 images .* extract the archive to a folder to stream it"):
        ImageFolder(root=archive, image_size=32).open()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(ValueError, match="is an archive; extract it to a folder to stream it"):
        ImageFolder(root=archive, image_size=32, stream=True)
    monkeypatch.delenv("COMPRESS_DATA_MAX_GB")
    data = ImageFolder(root=archive, image_size=32).open()  # fits: decoded into memory, same pixels
    assert torch.equal(data.raw("test", range(24)), ImageFolder(root=tree, image_size=32).open().raw("test", range(24)))


def test_an_unreadable_file_is_named_before_training(tree, tmp_path, capsys):
    bad = make_tree(tmp_path / "bad", train=4, val=2)
    (bad / "train" / "bees" / "999.jpg").write_bytes(b"")
    (bad / "train" / "bees" / "998.jpg").write_text("<html>not an image</html>")
    with pytest.raises(CompressError, match=r"^data.root: .*99[89].jpg: (the file is empty|not an image file)"):
        ImageFolder(root=bad, image_size=32, stream=True).open()
    with pytest.raises(CompressError, match=r"^data.root: .*99[89].jpg: cannot decode the image \(.*\)$") as err:
        ImageFolder(root=bad, image_size=32, stream=False).open()  # decoded at startup anyway
    assert "0x" not in str(err.value)


def _write_recipe(tmp_path: Path, root: Path, workers: int) -> Path:
    recipe = {
        "name": "corrupt",
        "device": "cpu",
        # mean/std given: computing them would decode the bad file at startup, not in a worker
        "data": {"name": "imagefolder", "root": str(root), "image_size": 32, "stream": True, "workers": workers,
                 "batch_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3},
        "student": {"model": "resnet20"},
        "stages": [{"kind": "train", "epochs": 1, "optim": {"precision": "fp32"}}],
    }  # fmt: skip
    path = tmp_path / f"r{workers}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_jpeg_mid_epoch_is_one_line_naming_it(tmp_path, capsys, workers):
    root = make_tree(tmp_path / "tree", train=8, val=2)
    victim = root / "train" / "cats" / "004.jpg"
    victim.write_bytes(victim.read_bytes()[:120])  # a JPEG header, then nothing: passes the startup check
    out = tmp_path / f"run{workers}"
    assert main(["run", str(_write_recipe(tmp_path, root, workers)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(victim) in err and "cannot decode the image" in err, err
    assert "Traceback" not in err and "DataLoader" not in err


DYING = """
import os
import torch

class Dying(torch.utils.data.Dataset):
    classes = ["a", "b"]
    def __len__(self):
        return 32
    def __getitem__(self, i):
        if i == 17 and os.environ.get("COMPRESS_TEST_DIE"):
            os._exit(3)  # a worker killed mid-epoch (an OOM kill, a segfaulting decoder)
        return torch.full((3, 8, 8), i % 2 * 200, dtype=torch.uint8), i % 2

def load():
    return Dying(), Dying()
"""


def test_a_dying_worker_is_one_line_not_a_hang(tmp_path, capsys, monkeypatch):
    (tmp_path / "dying_data.py").write_text(DYING)
    recipe = {
        "name": "dying",
        "device": "cpu",
        # mean/std given: computing them would read sample 17 in this process
        "data": {
            "name": "dying_data:load",
            "stream": True,
            "workers": 2,
            "batch_size": 8,
            "mean": [0.4] * 3,
            "std": [0.4] * 3,
        },
        "student": {"model": "digits_student"},
        "stages": [{"kind": "train", "epochs": 1, "optim": {"precision": "fp32"}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("COMPRESS_TEST_DIE", "1")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a loader worker died" in err and "workers: 0" in err, err


def test_user_datasets_stream_and_match_their_in_memory_form(tmp_path, monkeypatch):
    from compress.data.user import UserDataset

    (tmp_path / "dying_data.py").write_text(DYING)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMPRESS_TEST_DIE", raising=False)
    streamed = UserDataset(name="dying_data:load", stream=True, workers=0).open()
    memory = UserDataset(name="dying_data:load", stream=False).open()
    assert streamed.streaming and not memory.streaming
    assert torch.equal(streamed.raw("train", range(32)), memory.raw("train", range(32)))
    a = [y for _, y, _ in streamed.train_loader(seed=1, augment=False).batches()]
    b = [y for _, y, _ in memory.train_loader(seed=1, augment=False).batches()]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


INDEXED = """
import torch

class Indexed(torch.utils.data.Dataset):
    classes = ["a", "b", "c", "d"]  # sorted by class, as an ImageFolder tree is: image i is class i // 16
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return torch.full((1, 4, 4), i, dtype=torch.uint8), i // 16

def load():
    return Indexed(), Indexed()
"""


@pytest.mark.parametrize("form", ["imagefolder memory", "imagefolder streamed", "dataset memory", "dataset streamed"])
def test_limit_and_holdout_take_evenly_spaced_images_of_every_class(form, tree, tmp_path, monkeypatch):
    """``limit`` keeps every class of a class-sorted split; ``holdout`` moves evenly spaced training
    images into the test split and trains on exactly the others, in every form of data."""
    from compress.data.base import holdout_indices, spread
    from compress.data.user import UserDataset

    streamed = form.endswith("streamed")
    how = {"stream": True, "workers": 0, "batch_size": 16} if streamed else {"stream": False, "batch_size": 16}
    if form.startswith("dataset"):
        (tmp_path / "indexed_data.py").write_text(INDEXED)
        monkeypatch.chdir(tmp_path)
        data = UserDataset(name="indexed_data:load", **how).open()
    else:
        data = ImageFolder(root=tree, image_size=32, **how).open()
    assert data.streaming == streamed
    n, total, classes = 12, data.train_size, data.num_classes
    labels = torch.cat([y for _, y in data.raw_batches("train")])
    assert torch.equal(labels, labels.sort().values)  # class-sorted: the first n would be one class
    few = data.limit("train", n)
    assert few.train_size == n
    assert set(torch.cat([y for _, y in few.raw_batches("train")]).tolist()) == set(range(classes))

    held, rest = holdout_indices(total, n)
    split = data.holdout(n)
    assert (split.test_size, split.train_size) == (n, total - n)
    assert sorted([*held, *rest]) == list(range(total))  # disjoint, and nothing is lost
    # the held-out images are those training images, pixel for pixel and label for label; the rest trains
    assert torch.equal(split.raw("test", range(n)), data.raw("train", held))
    assert torch.equal(split.raw("train", range(total - n)), data.raw("train", rest))
    assert split.fingerprint() != data.fingerprint()  # a resumed run cannot take one for the other
    again = split.limit("train", 5)  # a subset of a subset reads the images it names
    assert torch.equal(again.raw("train", range(5)), data.raw("train", rest[spread(len(rest), 5)]))
    assert torch.equal(torch.cat([y for _, y in split.raw_batches("test")]), labels[held])
    assert set(labels[held].tolist()) == set(range(classes))
    trained = torch.cat([y for _, y, _ in split.train_loader(seed=0, augment=False).batches()])
    assert len(trained) == (total - n) // data.batch_size * data.batch_size  # whole batches of the rest
    with pytest.raises(ValueError, match="cannot hold out"):
        data.holdout(total)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = ImageFolder(root=Path(root), image_size=32, stream=True, workers=1, batch_size=16).open()
    loader = data.train_loader(seed=5, rank=rank, world=world)
    seen = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen.append(torch.cat([idx for _, _, idx in loader.batches()]))
    gathered = [[torch.empty(0, dtype=torch.long)] * 2 for _ in range(world)]
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        torch.save([[t.tolist() for t in g] for g in gathered], out)
    dist.destroy_process_group()


def test_ddp_ranks_take_disjoint_samples_and_reshuffle_per_epoch(tree, tmp_path):
    out = tmp_path / "seen.pt"
    torch.multiprocessing.start_processes(
        _rank, args=(2, _free_port(), str(tree), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    (r0e0, r0e1), (r1e0, r1e1) = torch.load(out, weights_only=True)
    for a, b in ((r0e0, r1e0), (r0e1, r1e1)):
        assert len(a) == len(b) == (72 // 2) // 8 * 8  # each rank: batches of 16 // 2
        assert not set(a) & set(b)
    assert r0e0 != r0e1
    # The union is what one process draws at the same seed: the tensor path's permutation.
    memory = ImageFolder(root=tree, image_size=32, stream=False, batch_size=16).open()
    perm = torch.randperm(72, generator=torch.Generator().manual_seed(5 * 100_003)).tolist()
    assert r0e0 == perm[0::2][: len(r0e0)] and r1e0 == perm[1::2][: len(r1e0)]
    assert memory.train_size == 72


def test_cached_teacher_logits_need_replayed_views_when_streaming(tree, tmp_path, capsys):
    recipe = {
        "name": "cache",
        "device": "cpu",
        "data": {"name": "imagefolder", "root": str(tree), "image_size": 32, "stream": True, "workers": 2,
                 "batch_size": 24},
        "teacher": {"model": "resnet20"},
        "student": {"model": "resnet20"},
        "stages": [{"kind": "distill", "epochs": 2, "optim": {"precision": "fp32"}, "kd": {"cache_teacher": True}}],
        "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "refused"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stages.0.kd.cache_teacher: the training images are randomly augmented anew every epoch" in err
    recipe["stages"][0]["kd"]["augment_views"] = 1
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    stage = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][0]["metrics"]
    assert "streaming 72 + 24 images" in (tmp_path / "run" / "train.log").read_text()
    assert len(stage["history"]) == 2  # both epochs trained, the second from cached logits


def test_the_python_api_exports_quantizes_and_measures_on_streamed_data(tree, tmp_path):
    import compress
    from compress.models import build_model

    block = {"name": "imagefolder", "root": str(tree), "image_size": 32, "eval_batch_size": 10}
    streamed = compress.load_data(block | {"stream": True, "workers": 2})
    memory = compress.load_data(block | {"stream": False})
    assert streamed.streaming and not memory.streaming
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=3).eval()
    exported = compress.export_onnx(model, tmp_path / "m.onnx", data=streamed)  # parity on streamed test images
    assert exported.parity["argmax_agreement"] == 1.0
    int8 = [compress.quantize_onnx(exported.path, d, out=tmp_path / f"q{i}.onnx", batches=2, batch_size=8)
            for i, d in enumerate((streamed, memory))]  # fmt: skip
    assert int8[0].calibration_images == int8[1].calibration_images == 16
    weights = [{t.name: t.raw_data for t in onnx.load(str(q.path)).graph.initializer} for q in int8]
    assert weights[0] == weights[1]  # the same calibration images, decoded by either path: the same scales
    assert compress.measure(int8[0].path, streamed)["top1"] == compress.measure(int8[1].path, memory)["top1"]


def test_compress_run_takes_streamed_data_and_quantize_views_a_folder_as_the_model_says(tree, tmp_path):
    import compress
    from compress.commands.quantize import data_config

    streamed = compress.load_data({"name": "imagefolder", "root": str(tree), "image_size": 32, "stream": True})
    recipe = {
        "name": "api-stream",
        "device": "cpu",
        "data": {"name": "digits"},  # replaced by data=
        "student": {"model": "resnet20"},
        "stages": [{"kind": "train", "epochs": 1, "optim": {"precision": "fp32"}}],
        "benchmark": {"batch_sizes": [1], "iters": 2, "warmup": 0, "devices": ["cpu"], "torch_snapshots": False},
    }
    result = compress.run(recipe, data=streamed, out=tmp_path / "run")
    assert "data: streaming 72 + 24 images" in (result.run_dir / "train.log").read_text()
    assert 0 <= result.artifacts[0].metrics["accuracy"] <= 1
    with pytest.raises(CompressError, match="data.stream: data= is a ready StreamBundle"):
        compress.run(recipe | {"data": {"stream": True}}, data=streamed, out=tmp_path / "again")
    for shorter, expected in ((32, 32), (36, 36), (256, 256), (None, None)):
        size = 32 if shorter is None or shorter < 100 else 224
        cfg = data_config(str(tree), image_size=(size, size), resize_shorter=shorter)
        assert cfg.shorter == expected
    assert data_config(str(tree), image_size=(32, 32)).shorter == 36  # a plain ONNX file: the default view
    for kw in ({"stream": False}, {"augment": False}, {"stream": True, "workers": 1}):
        cfg = ImageFolder(root=tree, **kw)
        assert ImageFolder(**cfg.model_dump()) == cfg  # a dumped config (recipe.resolved.yaml) validates again
