"""predict_datasets.py / predict_pair_datasets.py and their engine batch_inference.py.

Synthetic trees (40x48 slices, a randomly initialised StackMFFV2 saved with a
fixed seed) carry planted bad scenes; real stacks and Lytro pairs from
../shared/data run with the official weights when present.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import batch_inference
import inference
import options
import predict_datasets
import predict_pair_datasets
from fusion import FusionCard
from inference import OUTPUT_KINDS, fuse_images, render_outputs
from conftest import DATA, OFFICIAL_WEIGHTS, REPO, default_sigint, textured_stack
from model import load_model
from utils import InputError, read_image, read_stack, write_image

torch.set_num_threads(1)

OFFICIAL = OFFICIAL_WEIGHTS
REAL_STACKS = DATA / "stacks"
LYTRO = DATA / "pairs" / "Lytro"
needs_shared = pytest.mark.skipif(not (OFFICIAL.is_file() and REAL_STACKS.is_dir() and LYTRO.is_dir()),
                                  reason="../shared official weights or real data absent")

GOOD_STACKS = {  # scene -> (N, H, W)
    "s1": (3, 40, 48), "s2": (3, 40, 48), "s3": (3, 40, 48), "s10": (3, 40, 48),
    "tall": (3, 48, 40), "four": (4, 40, 48),
}


@pytest.fixture
def weights(random_weights):
    return random_weights


def write_stack(folder: Path, n, h, w, seed):
    folder.mkdir(parents=True)
    for k, image in enumerate(textured_stack(n, h, w, seed=seed), start=1):
        write_image(folder / f"{k}.png", image)


@pytest.fixture
def stack_root(tmp_path):
    """<root>/syn/dof_stack/<scene>: good stacks of three keys plus planted bad scenes."""
    stacks = tmp_path / "data" / "syn" / "dof_stack"
    for seed, (name, shape) in enumerate(GOOD_STACKS.items()):
        write_stack(stacks / name, *shape, seed=seed)
    write_stack(stacks / "one_image", 1, 40, 48, seed=90)
    write_stack(stacks / "mixed", 2, 40, 48, seed=91)
    cv2.imwrite(str(stacks / "mixed" / "3.png"), np.zeros((32, 48, 3), np.uint8))
    write_stack(stacks / "broken", 2, 40, 48, seed=92)
    (stacks / "broken" / "2.png").write_bytes(b"not a png at all")
    return tmp_path / "data"


def stack_args(root, weights, out, *extra):
    return predict_datasets.get_args_parser().parse_args(
        ["--test_root", str(root), "--test_datasets", "syn", "--model_path", str(weights),
         "--output_dir", str(out), "--num_workers", "0", "--device", "cpu", *extra])


def read_outputs(dataset_dir: Path, scene: str) -> dict:
    out = {}
    for stem, folder, ext in OUTPUT_KINDS:
        path = dataset_dir / folder / f"{scene}{ext}"
        out[stem] = np.load(path) if ext == ".npy" else read_image(path)
    return out


def assert_same_outputs(got: dict, want: dict):
    """A batched run against a single-stack run: identical, since the default
    fast path (fast_inference.fast_forward) runs every stack of a batch on its
    own and depth is normalised per stack."""
    for stem, value in want.items():
        np.testing.assert_array_equal(got[stem], value, err_msg=stem)


class TestPredictDatasets:
    def test_batches_equal_single_stack_path_and_bad_scenes_reported(self, stack_root, weights, tmp_path):
        out = tmp_path / "out"
        batched = predict_datasets.main(stack_args(stack_root, weights, out, "--batch_size", "3",
                                                   "--run_name", "b3"))
        single = predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "b1"))
        model = load_model(weights)
        for summary in (batched, single):
            report = summary.datasets[0]
            assert (report.scenes, report.fused, report.skipped) == (9, 6, 0)
            assert set(report.failed) == {"one_image", "mixed", "broken"}
            assert "at least 2" in report.failed["one_image"]
            assert "mixes image sizes" in report.failed["mixed"]
            assert "not a readable image" in report.failed["broken"]
            assert summary.exit_status == 1
            assert report.mean_ms is not None and report.mean_ms > 0
        for scene in GOOD_STACKS:
            images, _ = read_stack(stack_root / "syn" / "dof_stack" / scene)
            want = render_outputs(fuse_images(model, FusionCard.beside(weights), images), images)
            assert_same_outputs(read_outputs(out / "b3" / "syn", scene), want)
            assert_same_outputs(read_outputs(out / "b1" / "syn", scene), want)
        saved = json.loads((out / "b3" / "summary.json").read_text())["datasets"]["syn"]
        assert saved["fused"] == 6 and set(saved["failed"]) == {"one_image", "mixed", "broken"}
        assert saved["mean_inference_ms_per_stack"] > 0
        leftovers = [p for p in out.rglob("*") if p.name.endswith(".part")]
        assert not leftovers

    def test_align_registers_each_stack_before_fusing(self, tmp_path, weights):
        from Registration import align_stack
        base = cv2.resize(textured_stack(1, 24, 32, seed=5)[0], (128, 96), interpolation=cv2.INTER_CUBIC)
        folder = tmp_path / "data" / "syn" / "dof_stack" / "shaken"
        folder.mkdir(parents=True)
        for k, dx in enumerate((0, 2, -3), start=1):
            shifted = cv2.warpAffine(base, np.float32([[1, 0, dx], [0, 1, 0]]), (128, 96),
                                     borderMode=cv2.BORDER_REFLECT)
            write_image(folder / f"{k}.png", shifted)
        summary = predict_datasets.main(stack_args(tmp_path / "data", weights, tmp_path / "out",
                                                   "--run_name", "r", "--align", "ecc"))
        assert summary.datasets[0].fused == 1
        images, _ = read_stack(folder)
        aligned = align_stack(images, method="ecc")
        want = render_outputs(fuse_images(load_model(weights), FusionCard.beside(weights), aligned), aligned)
        assert_same_outputs(read_outputs(tmp_path / "out" / "r" / "syn", "shaken"), want)

    def test_only_same_size_and_length_share_a_batch(self, stack_root, weights, tmp_path, monkeypatch):
        seen = []
        real = inference.fuse_gray_batch

        def spy(model, card, gray, device=None, *more, **options):
            seen.append(tuple(gray.shape))
            return real(model, card, gray, device, *more, **options)

        monkeypatch.setattr(inference, "fuse_gray_batch", spy)           # what inference.fuse_stacks batches with
        predict_datasets.main(stack_args(stack_root, weights, tmp_path / "out", "--batch_size", "8"))
        assert sorted(seen) == sorted([(4, 3, 40, 48), (1, 3, 48, 40), (1, 4, 40, 48)])

    def test_failing_batch_is_retried_stack_by_stack(self, stack_root, weights, tmp_path, monkeypatch):
        real = inference.fuse_gray_batch

        def out_of_memory(model, card, gray, device=None, *more, **options):
            if gray.shape[0] > 1 or gray.shape[1:] == (3, 48, 40):   # any batch, and the 'tall' stack
                raise RuntimeError("out of memory")
            return real(model, card, gray, device, *more, **options)

        monkeypatch.setattr(inference, "fuse_gray_batch", out_of_memory)
        report = predict_datasets.main(stack_args(stack_root, weights, tmp_path / "out", "--batch_size", "4")).datasets[0]
        assert report.fused == 5
        assert report.failed["tall"] == "inference failed: RuntimeError: out of memory"

    def test_waiting_stacks_are_bounded(self, tmp_path, weights, monkeypatch):
        """Ten stacks of ten sizes, batch 2: none finds a partner, yet stacks run
        before the last one is read (at most 4 x batch size wait)."""
        stacks = tmp_path / "data" / "syn" / "dof_stack"
        for k in range(10):
            write_stack(stacks / f"s{k}", 2, 32 + k, 32, seed=k)
        events = []
        real_read, real_fuse = batch_inference.SceneReader.__call__, inference.fuse_gray_batch
        monkeypatch.setattr(batch_inference.SceneReader, "__call__",
                            lambda self, scene: events.append("read") or real_read(self, scene))
        monkeypatch.setattr(inference, "fuse_gray_batch",
                            lambda m, c, g, d=None, *a, **o: events.append("fuse") or real_fuse(m, c, g, d, *a, **o))
        report = predict_datasets.main(stack_args(tmp_path / "data", weights, tmp_path / "out",
                                                  "--batch_size", "2")).datasets[0]
        assert report.fused == 10
        assert events.index("fuse") < len(events) - 1 - events[::-1].index("read")

    def test_default_layout_and_missing_dataset(self, stack_root, weights, tmp_path, capsys):
        args = stack_args(stack_root, weights, tmp_path / "out")
        args.test_datasets = ["nope", "syn"]
        summary = predict_datasets.main(args)
        assert summary.run_dir.parent == tmp_path / "out" and summary.run_dir.name.startswith("results_")
        assert summary.datasets[0].missing and "does not exist" in summary.datasets[0].missing
        assert summary.datasets[1].fused == 6
        for _, folder, ext in OUTPUT_KINDS:
            assert sorted(p.name for p in (summary.run_dir / "syn" / folder).iterdir()) == \
                sorted(f"{s}{ext}" for s in GOOD_STACKS)
        text = capsys.readouterr().out
        assert "skipping dataset 'nope'" in text and "3 scene(s) failed" in text and "syn/mixed" in text

    def test_killed_run_resumes_without_redoing_finished_scenes(self, stack_root, weights, tmp_path,
                                                                 monkeypatch):
        import inference
        out = tmp_path / "out"
        real_write = inference.write_image
        calls = {"n": 0}

        def dying_write(path, image, *encoding):
            calls["n"] += 1
            if calls["n"] == 9:   # the fourth picture of the second scene: a kill mid-scene
                raise KeyboardInterrupt
            real_write(path, image, *encoding)

        monkeypatch.setattr(inference, "write_image", dying_write)
        with pytest.raises(KeyboardInterrupt):
            predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "r"))
        monkeypatch.setattr(inference, "write_image", real_write)
        first = out / "r" / "syn" / "fused_images" / "four.png"
        stamp = first.stat().st_mtime_ns
        assert (out / "r" / "syn" / "depth_maps" / "s1.png").exists()             # s1 half written
        assert not (out / "r" / "syn" / "depth_colormaps" / "s1.png").exists()
        assert not [p for p in out.rglob("*") if p.name.endswith(".part")]

        resumed = predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "r", "--skip_existing"))
        report = resumed.datasets[0]
        assert (report.skipped, report.fused, len(report.failed)) == (1, 5, 3)
        assert first.stat().st_mtime_ns == stamp
        again = predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "r", "--skip_existing"))
        assert (again.datasets[0].skipped, again.datasets[0].fused) == (6, 0)
        model = load_model(weights)
        for scene in GOOD_STACKS:
            images, _ = read_stack(stack_root / "syn" / "dof_stack" / scene)
            assert_same_outputs(read_outputs(out / "r" / "syn", scene),
                                render_outputs(fuse_images(model, FusionCard.beside(weights), images), images))

    def test_skip_existing_without_run_name_continues_newest_run(self, stack_root, weights, tmp_path, monkeypatch):
        out = tmp_path / "out"
        (out / "results_20000101_000000").mkdir(parents=True)
        # a fixed clock: the new run's name is known, whatever the machine's date
        real_strftime = time.strftime
        monkeypatch.setattr(batch_inference.time, "strftime",
                            lambda fmt: real_strftime(fmt, time.struct_time((2026, 12, 1, 20, 3, 14, 1, 335, 0))))
        first = predict_datasets.main(stack_args(stack_root, weights, out))
        assert first.run_dir.name == "results_20261201_200314"
        resumed = predict_datasets.main(stack_args(stack_root, weights, out, "--skip_existing"))
        assert resumed.run_dir == first.run_dir and resumed.datasets[0].skipped == 6

    def test_skip_existing_alone_continues_the_run_written_to_last(self, stack_root, weights, tmp_path, capsys):
        """Whatever its name: a run named r1, cut short, then --skip_existing without --run_name."""
        out = tmp_path / "out"
        older, cut = out / "results_20000101_000000", out / "r1"
        predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", older.name))
        predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", cut.name))
        (cut / "summary.json").unlink()                       # r1 ends as if killed after four scenes
        for scene in ("s3", "s10"):
            (cut / "syn" / "depth_maps" / f"{scene}.png").unlink()
        os.utime(older, ns=(10**18, 10**18))                  # last written to: r1, then the older run
        os.utime(cut, ns=(2 * 10**18, 2 * 10**18))
        capsys.readouterr()
        resumed = predict_datasets.main(stack_args(stack_root, weights, out, "--skip_existing"))
        assert resumed.run_dir == cut and (resumed.datasets[0].skipped, resumed.datasets[0].fused) == (4, 2)
        assert f"continuing {cut}, the run folder written to last" in capsys.readouterr().out
        os.utime(older, ns=(3 * 10**18, 3 * 10**18))
        assert predict_datasets.main(stack_args(stack_root, weights, out, "--skip_existing")).run_dir == older

    def test_the_single_stack_flags_apply_to_every_stack(self, stack_root, weights, tmp_path):
        """--reverse, --depth_bits and --outputs (once unknown to predict_datasets.py) as on one stack."""
        out, chosen = tmp_path / "out", ("depth_map", "depth_index")
        flags = ("--reverse", "--depth_bits", "16", "--outputs", *chosen)
        summary = predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "r", *flags))
        assert summary.datasets[0].fused == len(GOOD_STACKS)
        assert sorted(p.name for p in (out / "r" / "syn").iterdir()) == ["depth_indices", "depth_maps"]
        model = load_model(weights)
        for scene in GOOD_STACKS:
            images, _ = read_stack(stack_root / "syn" / "dof_stack" / scene)
            want = render_outputs(fuse_images(model, FusionCard.beside(weights), images), images, reverse=True,
                                  depth_bits=16, outputs=chosen)
            got = {"depth_map": read_image(out / "r" / "syn" / "depth_maps" / f"{scene}.png"),
                   "depth_index": np.load(out / "r" / "syn" / "depth_indices" / f"{scene}.npy")}
            assert got["depth_map"].dtype == np.uint16 and got["depth_index"].dtype == np.uint8
            assert_same_outputs(got, want)
        again = predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "r", "--skip_existing",
                                                 *flags))
        assert again.datasets[0].skipped == len(GOOD_STACKS)

    def test_reader_workers_give_the_same_outputs(self, stack_root, weights, tmp_path):
        out = tmp_path / "out"
        args = stack_args(stack_root, weights, out, "--run_name", "w2", "--batch_size", "2")
        args.num_workers = 2
        summary = predict_datasets.main(args)
        assert summary.datasets[0].fused == 6 and len(summary.datasets[0].failed) == 3
        model = load_model(weights)
        images, _ = read_stack(stack_root / "syn" / "dof_stack" / "s10")
        assert_same_outputs(read_outputs(out / "w2" / "syn", "s10"),
                            render_outputs(fuse_images(model, FusionCard.beside(weights), images), images))


class TestReaderWorkersDefault:
    def test_one_cpu_is_left_to_the_fusion(self):
        assert [options.default_workers(c) for c in (1, 2, 3, 5, 64)] == [0, 1, 2, 4, 4]

    def test_cpus_are_the_affinity_mask_where_there_is_one(self, monkeypatch):
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9}, raising=False)
        assert options.available_cpus() == 3
        monkeypatch.delattr(os, "sched_getaffinity")
        assert options.available_cpus() == 64

    def test_a_two_cpu_machine_gets_one_worker_and_no_torch_warning(self, stack_root, weights, tmp_path,
                                                                   monkeypatch):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        for script in (predict_datasets, predict_pair_datasets):
            assert script.get_args_parser().parse_args(["--test_root", "x", "--test_datasets", "y"]).num_workers == 1
        args = predict_datasets.get_args_parser().parse_args(
            ["--test_root", str(stack_root), "--test_datasets", "syn", "--model_path", str(weights),
             "--output_dir", str(tmp_path / "out"), "--run_name", "r", "--device", "cpu"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert predict_datasets.main(args).datasets[0].fused == 6
        assert [str(w.message) for w in caught if "worker" in str(w.message)] == []


# One thread per process: on a busy 2-core machine two threads per process run 30x slower.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def run_cli(script, *argv):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], cwd=REPO, env=ONE_THREAD,
                          capture_output=True, text=True, timeout=120)


class TestCommandLine:
    def test_exit_status_and_errors(self, stack_root, weights, tmp_path):
        with pytest.raises(InputError, match="does not exist"):
            predict_datasets.main(stack_args(tmp_path / "gone", weights, tmp_path / "o"))
        failing = run_cli("predict_datasets.py", "--test_root", stack_root, "--test_datasets", "syn",
                          "--model_path", weights, "--output_dir", tmp_path / "o", "--num_workers", "0")
        assert failing.returncode == 1 and "3 scene(s) failed" in failing.stdout
        assert "Traceback" not in failing.stderr
        for bad in ("one_image", "mixed", "broken"):
            shutil.rmtree(stack_root / "syn" / "dof_stack" / bad)
        assert predict_datasets.main(stack_args(stack_root, weights, tmp_path / "o")).exit_status == 0

    def test_bad_checkpoint_is_an_input_error(self, pair_root, tmp_path):
        junk = tmp_path / "junk.pth"
        junk.write_bytes(b"junk")
        with pytest.raises(InputError, match="junk.pth"):
            predict_pair_datasets.main(pair_args(pair_root, junk, tmp_path / "o"))

    def test_torchrun_two_processes_equal_one(self, stack_root, weights, tmp_path):
        """Two CPU ranks split the scenes; their union equals a one-process run and
        rank 0's summary covers both ranks."""
        with socket.socket() as s:   # a free port, so that parallel runs do not collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        common = ["--test_root", stack_root, "--test_datasets", "syn", "nope", "--model_path", weights,
                  "--output_dir", tmp_path / "out", "--num_workers", "0", "--batch_size", "2"]
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                              "--master_addr=127.0.0.1", f"--master_port={port}", "predict_datasets.py",
                              *map(str, common), "--run_name", "two"],
                             cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=180)
        assert two.returncode == 1, two.stderr[-2000:]   # the planted bad scenes fail
        one = predict_datasets.main(predict_datasets.get_args_parser().parse_args(
            [*map(str, common), "--run_name", "one"]))
        assert one.exit_status == 1
        for _, folder, _ in OUTPUT_KINDS:
            names = sorted(p.name for p in (tmp_path / "out" / "two" / "syn" / folder).iterdir())
            assert names == sorted(p.name for p in (tmp_path / "out" / "one" / "syn" / folder).iterdir())
            assert len(names) == len(GOOD_STACKS)
        for scene in GOOD_STACKS:
            assert_same_outputs(read_outputs(tmp_path / "out" / "two" / "syn", scene),
                                read_outputs(tmp_path / "out" / "one" / "syn", scene))
        summary = json.loads((tmp_path / "out" / "two" / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert summary["datasets"]["syn"]["fused"] == 6
        assert set(summary["datasets"]["syn"]["failed"]) == {"one_image", "mixed", "broken"}
        assert summary["datasets"]["nope"]["missing"]


@pytest.fixture
def pair_root(tmp_path):
    """<root>/pairs/{A,B}: pairs 1, 2, 10 (40x48), a mixed-size pair 3, and
    unpartnered A/4, B/5, a nameless A/x.png and an ambiguous number 6."""
    rng = np.random.default_rng(7)
    root = tmp_path / "pairs_data"
    a, b = root / "pairs" / "A", root / "pairs" / "B"
    a.mkdir(parents=True)
    b.mkdir()

    def img(h=40, w=48):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    for k in (1, 2, 10):
        cv2.imwrite(str(a / f"{k}.png"), img())
        cv2.imwrite(str(b / f"{k}.jpg"), img())
    cv2.imwrite(str(a / "3.png"), img())
    cv2.imwrite(str(b / "3.png"), img(32, 48))
    cv2.imwrite(str(a / "4.png"), img())
    cv2.imwrite(str(b / "5.png"), img())
    cv2.imwrite(str(a / "x.png"), img())
    cv2.imwrite(str(a / "6.png"), img())
    cv2.imwrite(str(a / "6.bmp"), img())
    cv2.imwrite(str(b / "6.png"), img())
    return root


def pair_args(root, weights, out, *extra):
    return predict_pair_datasets.get_args_parser().parse_args(
        ["--test_root", str(root), "--test_datasets", "pairs", "--model_path", str(weights),
         "--output_dir", str(out), "--num_workers", "0", "--device", "cpu", *extra])


class TestPredictPairDatasets:
    def test_pair_number(self):
        assert predict_pair_datasets.pair_number(Path("A/10.png")) == (10,)
        assert predict_pair_datasets.pair_number(Path("lytro-01-A.jpg")) == (1,)
        assert predict_pair_datasets.pair_number(Path("left.png")) is None

    def test_pairs_fused_and_unpaired_files_listed(self, pair_root, weights, tmp_path):
        out = tmp_path / "out"
        summary = predict_pair_datasets.main(pair_args(pair_root, weights, out, "--batch_size", "3",
                                                       "--run_name", "r"))
        report = summary.datasets[0]
        assert report.fused == 3 and summary.exit_status == 1
        failed = report.failed
        assert set(failed) == {"3", "A/4.png", "B/5.png", "A/x.png", "A/6.bmp"}
        assert "mixes image sizes" in failed["3"]
        assert "no partner numbered 4 in B/" in failed["A/4.png"]
        assert "no partner numbered 5 in A/" in failed["B/5.png"]
        assert "no number" in failed["A/x.png"]
        assert "ambiguous" in failed["A/6.bmp"] and "B/6.png" in failed["A/6.bmp"]
        model = load_model(weights)
        for k in (1, 2, 10):
            images = [read_image(pair_root / "pairs" / "A" / f"{k}.png"),
                      read_image(pair_root / "pairs" / "B" / f"{k}.jpg")]
            assert_same_outputs(read_outputs(out / "r" / "pairs", str(k)),
                                render_outputs(fuse_images(model, FusionCard.beside(weights), images), images))

    def test_reverse_flips_depth_and_index(self, pair_root, weights, tmp_path):
        out = tmp_path / "out"
        predict_pair_datasets.main(pair_args(pair_root, weights, out, "--run_name", "fwd"))
        predict_pair_datasets.main(pair_args(pair_root, weights, out, "--run_name", "rev", "--reverse"))
        fwd, rev = read_outputs(out / "fwd" / "pairs", "1"), read_outputs(out / "rev" / "pairs", "1")
        np.testing.assert_array_equal(rev["depth_index"], 1 - fwd["depth_index"])
        np.testing.assert_array_equal(rev["fused_gray"], fwd["fused_gray"])

    def test_missing_side_folder_skips_dataset(self, pair_root, weights, tmp_path):
        shutil.rmtree(pair_root / "pairs" / "B")
        summary = predict_pair_datasets.main(pair_args(pair_root, weights, tmp_path / "out"))
        assert "no 'B' folder" in summary.datasets[0].missing and summary.exit_status == 1


@needs_shared
class TestRealData:
    def test_real_stack_with_official_weights(self, tmp_path):
        args = predict_datasets.get_args_parser().parse_args(
            ["--test_root", str(REAL_STACKS), "--test_datasets", "EDF_BIG_microscopy",
             "--model_path", str(OFFICIAL), "--output_dir", str(tmp_path), "--run_name", "real",
             "--num_workers", "0", "--device", "cpu"])
        summary = predict_datasets.main(args)
        assert summary.exit_status == 0 and summary.datasets[0].fused == 1
        images, _ = read_stack(REAL_STACKS / "EDF_BIG_microscopy" / "dof_stack" / "skeleton-zeiss")
        want = render_outputs(fuse_images(load_model(OFFICIAL), FusionCard.beside(OFFICIAL), images), images)
        got = read_outputs(tmp_path / "real" / "EDF_BIG_microscopy", "skeleton-zeiss")
        for stem in want:
            np.testing.assert_array_equal(got[stem], want[stem], err_msg=stem)

    @pytest.mark.slow
    def test_real_lytro_pairs_batched(self, tmp_path):
        """Two Lytro pairs in one batch give the single-pair results."""
        root = tmp_path / "data"
        for side in "AB":
            (root / "Lytro" / side).mkdir(parents=True)
            for k in (1, 2):
                (root / "Lytro" / side / f"{k}.jpg").symlink_to(LYTRO / side / f"{k}.jpg")
        args = predict_pair_datasets.get_args_parser().parse_args(
            ["--test_root", str(root), "--test_datasets", "Lytro", "--model_path", str(OFFICIAL),
             "--output_dir", str(tmp_path / "out"), "--run_name", "lytro", "--batch_size", "2",
             "--num_workers", "0", "--device", "cpu"])
        summary = predict_pair_datasets.main(args)
        assert summary.exit_status == 0 and summary.datasets[0].fused == 2
        model = load_model(OFFICIAL)
        for k in (1, 2):
            images = [read_image(LYTRO / "A" / f"{k}.jpg"), read_image(LYTRO / "B" / f"{k}.jpg")]
            assert_same_outputs(read_outputs(tmp_path / "out" / "lytro" / "Lytro", str(k)),
                                render_outputs(fuse_images(model, FusionCard.beside(OFFICIAL), images), images))


def reader_processes(pid) -> list:
    """The child processes of ``pid`` (its reader processes), from Linux's /proc."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir() or not (tasks / str(pid) / "children").exists():
        pytest.skip("needs Linux's /proc/<pid>/task/<tid>/children")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def has_ended(pid) -> bool:
    """No process ``pid``, or only its zombie (its parent is gone or has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class TestInterruption:
    """Real signals to a running predict_datasets.py and its reader processes: one line, the right
    exit status, no hang, only whole files, then a resume finishes."""

    def start(self, tmp_path, weights, workers, scenes=40, slices=4, side=160, threads=1):
        """The run, once it has written 3 whole scenes (the next one's pass under way), and its readers."""
        import time
        # Stacks large enough that the run lasts a few seconds: on a loaded
        # machine a 1-second run could end before the signal is sent.
        for k in range(scenes):
            write_stack(tmp_path / "data" / "syn" / "dof_stack" / f"s{k}", slices, side, side, seed=k)
        process = subprocess.Popen(
            [sys.executable, str(REPO / "predict_datasets.py"), "--test_root", str(tmp_path / "data"),
             "--test_datasets", "syn", "--model_path", str(weights), "--output_dir", str(tmp_path / "out"),
             "--run_name", "r", "--num_workers", str(workers), "--device", "cpu"],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint)
        last_kind = tmp_path / "out" / "r" / "syn" / OUTPUT_KINDS[-1][1]       # each scene's last file
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if last_kind.is_dir() and len(list(last_kind.glob("*.png"))) >= 3:     # not the .part files
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be interrupted"
        readers = reader_processes(process.pid)
        assert len(readers) == workers
        return process, readers

    @pytest.mark.parametrize("how", [
        "SIGTERM to the process",
        "Ctrl-C (SIGINT to the group, reader workers)",
        # Two torch threads: an interrupt waits for the pass's running jobs, and there, before this change,
        # the DataLoader's error about its killed worker replaced the interrupt ('inference failed'), and the
        # run hung on the half message the worker had been sending.
        "SIGTERM to the group (a scheduler's stop, reader workers, two torch threads)",
        "SIGTERM to the main process only (`timeout`, reader workers)"])
    def test_killed_process_leaves_whole_files_and_resumes(self, tmp_path, weights, how):
        import time
        out = tmp_path / "out"
        size = dict(scenes=8, slices=6, side=384, threads=2) if "two torch threads" in how else {}
        process, readers = self.start(tmp_path, weights, 0 if how == "SIGTERM to the process" else 1, **size)
        if "group" in how:
            os.killpg(process.pid, signal.SIGINT if how.startswith("Ctrl-C") else signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)   # no hang: it ends within seconds
        assert process.returncode == 130, stderr[-2000:]
        assert stderr.rstrip().endswith("interrupted")
        for trouble in ("Traceback", "Exception ignored", "terminate called", "failed"):
            assert trouble not in stdout + stderr, (stdout + stderr)[-2000:]
        deadline = time.monotonic() + 20
        while not all(map(has_ended, readers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(has_ended, readers)), "a reader process outlived the run"

        side, scenes = size.get("side", 160), size.get("scenes", 40)
        written = [p for p in (out / "r").rglob("*") if p.is_file()]
        assert not [p for p in written if ".part" in p.name]
        for path in written:   # every file that exists decodes whole
            if path.suffix == ".npy":
                assert np.load(path).shape == (side, side)
            else:
                assert read_image(path).shape[:2] == (side, side)
        done = [k for k in range(scenes)
                if batch_inference.is_done(batch_inference.scene_output_paths(out / "r" / "syn", f"s{k}"))]
        assert 3 <= len(done) < scenes

        resumed = predict_datasets.main(stack_args(tmp_path / "data", weights, out, "--run_name", "r",
                                                   "--skip_existing"))
        report = resumed.datasets[0]
        assert report.skipped == len(done) and report.skipped + report.fused == scenes
        assert not report.failed and resumed.exit_status == 0

    def test_a_killed_reader_is_replaced_and_the_batch_goes_on(self, tmp_path, weights):
        """SIGKILL to the reader process, as the out-of-memory killer sends it: a fresh reader
        reads its scene again, every scene is fused, exit status 0, one line about it."""
        process, (reader,) = self.start(tmp_path, weights, workers=1)
        os.kill(reader, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)  # the rest of the run; before: a hang
        assert process.returncode == 0, stderr[-2000:]
        said = [line for line in stdout.splitlines() + stderr.splitlines() if "reader process" in line]
        assert len(said) == 1 and said[0].endswith(": its reader process was killed by SIGKILL; "
                                                   "reading it again in a new one"), said
        assert "Traceback" not in stderr
        summary = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["datasets"]["syn"]
        assert (summary["fused"], summary["failed"]) == (40, {})


class TestOutputAndCheckpoint:
    def test_output_dir_equal_to_test_root_leaves_the_input_alone(self, stack_root, weights):
        """Outputs go to <output_dir>/<run>/<dataset>/<kind>/: even with --output_dir
        equal to --test_root (or to the dataset folder) no input file is touched."""
        before = {p: p.read_bytes() for p in stack_root.rglob("*") if p.is_file()}
        for out in (stack_root, stack_root / "syn"):
            summary = predict_datasets.main(stack_args(stack_root, weights, out, "--run_name", "r"))
            assert summary.datasets[0].fused == len(GOOD_STACKS) and summary.datasets[0].scenes == 9
        assert {p: p.read_bytes() for p in before} == before

    def test_checkpoint_of_another_network_writes_nothing(self, stack_root, tmp_path):
        torch.save(torch.nn.Conv2d(1, 1, 3).state_dict(), tmp_path / "other.pth")
        with pytest.raises(InputError, match="not a StackMFF-V2 checkpoint"):
            predict_datasets.main(stack_args(stack_root, tmp_path / "other.pth", tmp_path / "o"))
        assert not (tmp_path / "o").exists()
