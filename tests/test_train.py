"""train.py: released flags, init, a tiny end-to-end run, checkpoints, resume, export, errors, torchrun.

The loss is tested in test_losses.py, one epoch and validation in test_engine.py."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
import engine
from fusion import FusionCard
from model import StackMFFV2, init_weights, load_model
from network_blocks import ConvGRUCell
from synthetic_stacks import make_dataset
from utils import InputError

from conftest import REPO  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": make_dataset(root / "train", num_scenes=16, slice_counts=(4, 6), size=64, seed=1),
            "val": make_dataset(root / "val", num_scenes=6, slice_counts=(4, 6), size=64, seed=2)}


def tiny_args(data, save_dir, *extra):
    return train.get_args_parser().parse_args([
        "--train_dataset", *data["train"], "--val_dataset", *data["val"],
        "--training_image_size", "64", "--batch_size", "4", "--num_epochs", "2", "--lr", "2e-3",
        "--num_workers", "0", "--num_threads", "1", "--device", "cpu",
        "--save_dir", str(save_dir), "--save_name", "run", *extra])


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """Two uninterrupted epochs: (summary, run folder)."""
    save_dir = tmp_path_factory.mktemp("runs")
    summary = train.main(tiny_args(data, save_dir))
    return summary, save_dir / "run"


class TestArguments:
    parser = train.get_args_parser()

    @pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("false", False), ("0", False),
                                             ("1", True), ("yes", True), ("no", False)])
    def test_released_boolean_flags(self, text, value):
        args = self.parser.parse_args(["--use_train_dataset_2", text, "--use_val_dataset_5", text])
        assert args.use_train_dataset_2 is value and args.use_val_dataset_5 is value
        assert args.use_train_dataset_1 is True  # untouched default

    def test_bare_boolean_flag_is_true_and_junk_is_refused(self, capsys):
        assert self.parser.parse_args(["--use_val_dataset_3"]).use_val_dataset_3 is True
        with pytest.raises(SystemExit):
            self.parser.parse_args(["--use_train_dataset_1", "maybe"])
        assert "expected a boolean" in capsys.readouterr().err

    def test_released_defaults(self):
        args = self.parser.parse_args([])
        assert (args.batch_size, args.num_epochs, args.lr, args.lr_decay, args.training_image_size,
                args.loss) == (12, 50, 1e-3, 0.9, 384, "mse")

    def test_sources_from_released_slots_and_repeatable_flag(self):
        args = self.parser.parse_args([
            "--train_stack", "a/s", "--train_depth_continuous", "a/d",
            "--train_stack_3", "c/s", "--train_depth_continuous_3", "c/d",
            "--train_stack_4", "d/s", "--train_depth_continuous_4", "d/d", "--use_train_dataset_4", "False",
            "--train_dataset", "x/s", "x/d", "--train_dataset", "y/s", "y/d"])
        assert train.dataset_sources(args, "train") == [("x/s", "x/d"), ("y/s", "y/d"), ("a/s", "a/d"),
                                                        ("c/s", "c/d")]
        assert train.dataset_sources(args, "val") == []

    def test_stack_without_depth_is_an_error(self):
        args = self.parser.parse_args(["--val_stack_2", "v/s"])
        with pytest.raises(InputError, match="--val_stack_2 is given without --val_depth_continuous_2"):
            train.dataset_sources(args, "val")

    def test_training_size_must_be_a_multiple_of_32(self):
        with pytest.raises(SystemExit):
            self.parser.parse_args(["--training_image_size", "100"])

    def test_released_flags_stay_out_of_help_and_saved_arguments(self):
        help_text = self.parser.format_help().split("options:", 1)[1]   # after the description
        assert "--train_stack" not in help_text and "--use_val_dataset" not in help_text
        assert "--train_dataset" in help_text and "--fusion_temperature" in help_text
        args = self.parser.parse_args(["--train_stack_2", "/tmp/b/image_stacks", "--train_depth_continuous_2",
                                       "/tmp/b/depth_maps", "--train_dataset", "/tmp/a/image_stacks",
                                       "/tmp/a/depth_maps", "--export", "/tmp/out/w.pth"])
        recorded = train.recorded_args(args)
        assert not [k for k in recorded if "_stack" in k or "depth_continuous" in k or k.startswith("use_")]
        assert recorded["train_dataset"] == [["/tmp/a/image_stacks", "/tmp/a/depth_maps"],
                                             ["/tmp/b/image_stacks", "/tmp/b/depth_maps"]]
        card = train.card_args(args)
        assert card["train_dataset"] == ["a", "b"] and card["export"] == "w.pth"
        assert "/tmp" not in json.dumps(card) and card.keys() == recorded.keys()

    def test_crop_not_a_multiple_of_32_is_one_usage_line(self, tmp_path):
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(tmp_path), str(tmp_path),
                                 "--crop", "48"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "the crop must be 0 (off) or a positive multiple of 32" in result.stderr

    def test_sharpest_target_without_all_in_focus_is_refused(self, data, tmp_path):
        with pytest.raises(InputError, match="--ce_target sharpest needs --all_in_focus"):
            train.main(tiny_args(data, tmp_path, "--loss", "mse+ce", "--ce_target", "sharpest"))

    def test_card_flags_make_the_loss_and_the_export_card(self):
        args = self.parser.parse_args(["--loss", "mse+ce", "--ce_weight", "0.3", "--fusion_weight", "30",
                                       "--views", "4", "--fusion_temperature", "1", "--focus_prior", "4",
                                       "--depth_window", "1.5", "--base_sigma", "2", "--base_weight_sigma", "0.7"])
        card = FusionCard("argmax", 4, 1.0, 4.0, 1.5, 2.0, 0.7)
        assert train.card_of(args) == card
        loss = train.loss_from_args(args)
        assert loss.card == card and (loss.weights.ce, loss.weights.fusion, loss.weights.distance) == (0.3, 30, 0)
        released = self.parser.parse_args([])
        assert train.card_of(released) == FusionCard() and train.loss_from_args(released).weights.ce == 0
        given_rule = self.parser.parse_args(["--loss", "mse+ce", "--index_rule", "minmax_round"])
        assert train.card_of(given_rule).index_rule == "minmax_round"

    def test_blend_setting_without_a_temperature_is_one_line(self, data, tmp_path):
        with pytest.raises(InputError, match="focus_prior 4 has no effect with fusion_temperature 0"):
            train.main(tiny_args(data, tmp_path, "--fusion_weight", "1", "--focus_prior", "4"))
        assert not (tmp_path / "run").exists()
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(tmp_path), str(tmp_path),
                                 "--depth_window", "-1"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "depth_window must be a number >= 0" in result.stderr


class TestReleasedInit:
    def test_released_init(self):
        torch.manual_seed(0)
        model = StackMFFV2()
        init_weights(model)
        gates = model.layer_interaction.layer_interaction_depth.forward_cell_list[0].conv_gates.weight
        flat = gates.reshape(gates.shape[0], -1)                 # (32, 216): orthogonal rows
        torch.testing.assert_close(flat @ flat.T, torch.eye(32), atol=1e-5, rtol=0)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(abs(m.weight.std().item() - 0.001) < 0.0005 for m in linears)
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
        biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
        assert all(torch.all(b == 0) for b in biases)
        conv = model.feature_extraction.encoder1[0].weight       # fan_out = 8 * 3 * 3
        assert abs(conv.std().item() - (2 / 72) ** 0.5) < 0.07
        for cell in (m for m in model.modules() if isinstance(m, ConvGRUCell)):
            can = cell.conv_can.weight.reshape(16, -1)           # (16, 216)
            torch.testing.assert_close(can @ can.T, torch.eye(16), atol=1e-5, rtol=0)


class TestTraining:
    def test_validation_loss_drops(self, reference_run, data):
        summary, run_dir = reference_run
        # Loss of the released init on the validation set, before any step.
        args = tiny_args(data, run_dir.parent)
        torch.manual_seed(args.seed)
        model = StackMFFV2()
        init_weights(model)
        from dataset import FocusStackDataset, GroupedBatchSampler
        val_set = FocusStackDataset([data["val"]], 64)
        loader = train.make_loader(val_set, GroupedBatchSampler(val_set.num_slices, 4, shuffle=False), 0,
                                   torch.device("cpu"))
        initial, _, _ = engine.evaluate(engine.LogitsAndDepth(model), loader, engine.Runtime(torch.device("cpu")))
        final = summary["history"][-1]["val"]["val"][0]
        assert final < 0.7 * initial, (initial, final)
        with open(run_dir / "validation.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["epoch"] for r in rows] == ["1", "2"]
        assert float(rows[1]["val_mse"]) == pytest.approx(final, rel=1e-4)
        assert float(rows[1]["lr"]) == pytest.approx(2e-3 * 0.9)
        assert sorted(p.name for p in (run_dir / "pictures").iterdir()) == ["val_epoch001.png", "val_epoch002.png"]
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert "git_commit" in (run_dir / "run_info.json").read_text()

    def test_checkpoints_load_with_load_model(self, reference_run):
        _, run_dir = reference_run
        assert {p.name for p in run_dir.glob("*.pth")} == {"last.pth", "best.pth", "epoch_001.pth", "epoch_002.pth"}
        state = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
        assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
        assert {"optimizer", "scheduler", "args", "rng"} <= set(state)
        model = load_model(run_dir / "last.pth", "cpu")
        for key, value in model.state_dict().items():
            assert torch.equal(value, state["model"][key])

    def test_resume_after_an_interrupted_epoch_gives_the_same_weights(self, reference_run, data, tmp_path,
                                                                      monkeypatch):
        original = train.train_one_epoch

        def interrupted(net, loss_fn, loader, optimizer, scaler, runtime, epoch, *rest, **kwargs):
            given = (net, loss_fn, loader, optimizer, scaler, runtime, epoch, *rest)
            if epoch == 1:  # take two optimiser steps of the second epoch, then "crash"
                original(*given, **{**kwargs, "max_steps": 2})
                raise KeyboardInterrupt
            return original(*given, **kwargs)

        monkeypatch.setattr(train, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.main(tiny_args(data, tmp_path))
        monkeypatch.setattr(train, "train_one_epoch", original)
        train.main(tiny_args(data, tmp_path, "--resume", str(tmp_path / "run" / "last.pth")))

        expected = torch.load(reference_run[1] / "last.pth", weights_only=True)
        resumed = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
        for key, value in expected["model"].items():
            torch.testing.assert_close(resumed["model"][key], value, atol=0, rtol=0, msg=key)
        assert resumed["scheduler"] == expected["scheduler"] and resumed["epoch"] == 2
        with open(tmp_path / "run" / "validation.csv", newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]

    def test_non_finite_loss_stops_the_run(self, data, tmp_path, monkeypatch):
        monkeypatch.setattr(train, "loss_from_args", lambda args: lambda logits, *a: logits.sum() * float("nan"))
        with pytest.raises(InputError, match="loss became nan at epoch 1, step 1"):
            train.main(tiny_args(data, tmp_path))
        assert not list((tmp_path / "run").glob("*.pth"))

    def test_resume_from_bare_weights_is_refused(self, data, tmp_path):
        torch.save(StackMFFV2().state_dict(), tmp_path / "weights.pth")
        with pytest.raises(InputError, match="weights only.*--pretrained"):
            train.main(tiny_args(data, tmp_path, "--resume", str(tmp_path / "weights.pth")))

    def test_pretrained_weights_are_the_starting_point(self, data, tmp_path):
        torch.manual_seed(7)
        weights = StackMFFV2().state_dict()
        torch.save({"module." + k: v for k, v in weights.items()}, tmp_path / "weights.pth")
        # lr 0: AdamW leaves the weights where they started, so the checkpoint shows the start.
        train.main(tiny_args(data, tmp_path, "--pretrained", str(tmp_path / "weights.pth"), "--lr", "0",
                             "--num_epochs", "1", "--max_steps_per_epoch", "1", "--max_val_batches", "1"))
        saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
        assert all(torch.equal(saved[k], v) for k, v in weights.items())

    def test_compact_recipe_exports_weights_with_their_card(self, data, tmp_path, capsys):
        export = tmp_path / "weights" / "mine.pth"
        summary = train.main(tiny_args(data, tmp_path, "--num_epochs", "1", "--crop", "32", "--rotate",
                                       "--zoom", "1.5", "--contrast", "0.3", "--lr_schedule", "cosine",
                                       "--loss", "mse+ce", "--ce_weight", "1", "--fusion_weight", "1",
                                       "--distance_weight", "1", "--export", str(export),
                                       "--fusion_temperature", "0.1", "--base_sigma", "2",
                                       "--base_weight_sigma", "0.7"))
        assert summary["history"][0]["train_loss"] > 0
        saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
        exported = torch.load(export, weights_only=True)
        assert exported.keys() == saved["model"].keys()
        assert all(torch.equal(exported[k], v) for k, v in saved["model"].items())
        card = json.loads(export.with_suffix(".json").read_text())
        assert card["index_rule"] == "argmax" and card["trained_by"] == "train.py"
        assert card["args"]["crop"] == 32 and card["epochs_done"] == 1
        assert FusionCard.beside(export) == FusionCard("argmax", 1, 0.1, base_sigma=2.0, base_weight_sigma=0.7)
        assert card["args"]["train_dataset"] == ["train"] and card["args"]["export"] == "mine.pth"
        assert str(tmp_path) not in json.dumps(card)
        load_model(str(export))
        assert "exported the final weights" in capsys.readouterr().out

    def test_resume_of_a_finished_run_still_exports(self, reference_run, data, tmp_path):
        export = tmp_path / "w.pth"
        train.main(tiny_args(data, tmp_path, "--resume", str(reference_run[1] / "last.pth"),
                             "--export", str(export)))
        assert json.loads(export.with_suffix(".json").read_text())["epochs_done"] == 2
        saved = torch.load(reference_run[1] / "last.pth", weights_only=True)["model"]
        assert all(torch.equal(torch.load(export, weights_only=True)[k], v) for k, v in saved.items())

    def test_time_budget_stops_and_still_saves(self, data, tmp_path, capsys):
        # A budget of a few milliseconds runs out at the first check of epoch 1.
        summary = train.main(tiny_args(data, tmp_path, "--max_minutes", "0.00001", "--lr_schedule", "cosine",
                                       "--export", str(tmp_path / "w.pth")))
        assert len(summary["history"]) == 1
        assert (tmp_path / "run" / "last.pth").is_file() and (tmp_path / "w.pth").is_file()
        assert "budget ran out during epoch 1" in capsys.readouterr().out

    def test_budget_spent_between_epochs_adds_no_empty_epoch(self, data, tmp_path, monkeypatch, capsys):
        original = train.train_one_epoch

        def spent_before_epoch_two(net, loss_fn, loader, optimizer, scaler, runtime, epoch, *rest, **kwargs):
            if epoch == 1:
                kwargs["clock"].budget = 1e-9     # already spent at the first check of the epoch
            return original(net, loss_fn, loader, optimizer, scaler, runtime, epoch, *rest, **kwargs)

        monkeypatch.setattr(train, "train_one_epoch", spent_before_epoch_two)
        export = tmp_path / "w.pth"
        summary = train.main(tiny_args(data, tmp_path, "--max_minutes", "10", "--lr_schedule", "cosine",
                                       "--export", str(export)))
        assert [h["epoch"] for h in summary["history"]] == [1]
        assert summary["history"][0]["train_loss"] > 0
        with open(tmp_path / "run" / "validation.csv", newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
        assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1
        assert json.loads(export.with_suffix(".json").read_text())["epochs_done"] == 1
        assert "budget ran out after epoch 1" in capsys.readouterr().out

    def test_cli_error_is_one_line(self, tmp_path):
        result = subprocess.run([sys.executable, "train.py", "--train_dataset", str(tmp_path / "no"),
                                 str(tmp_path / "no_depth")], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: stack folder '{tmp_path / 'no'}' does not exist"]


def test_torchrun_two_cpu_processes(data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py", "--train_dataset", *data["train"], "--val_dataset", *data["val"],
               "--training_image_size", "32", "--batch_size", "2", "--num_epochs", "1", "--num_workers", "0",
               "--num_threads", "1", "--device", "cpu", "--max_steps_per_epoch", "3",
               "--save_dir", str(tmp_path), "--save_name", "ddp"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1: train loss") == 1  # only the main process reports
    state = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)
    assert state["args"]["batch_size"] == 2 and len(state["rng"]) == 2
    model = load_model(tmp_path / "ddp" / "last.pth")
    assert np.isfinite(sum(v.abs().sum().item() for v in model.state_dict().values()))


def test_unreadable_slice_in_a_loader_worker_gives_the_plain_message(data, tmp_path):
    import shutil
    stacks = tmp_path / "set" / "image_stacks"
    shutil.copytree(Path(data["val"][0]), stacks)
    (stacks / "scene2" / "3.png").write_bytes(b"not a png")
    args = train.get_args_parser().parse_args([
        "--train_dataset", str(stacks), data["val"][1], "--training_image_size", "32", "--batch_size", "8",
        "--num_epochs", "1", "--num_workers", "1", "--device", "cpu", "--save_dir", str(tmp_path)])
    with pytest.raises(InputError) as caught:
        train.main(args)
    assert str(caught.value) == f"'{stacks / 'scene2' / '3.png'}' is not a readable image " \
                                "(corrupt, truncated or unsupported format)"


class TestWrongCheckpoints:
    @pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
    def test_junk_file(self, data, tmp_path, flag):
        (tmp_path / "junk.pth").write_bytes(b"\x80\x02 not a checkpoint")
        with pytest.raises(InputError, match="junk.pth.*not a readable PyTorch checkpoint"):
            train.main(tiny_args(data, tmp_path, flag, str(tmp_path / "junk.pth")))
        assert not (tmp_path / "run").exists()

    @pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
    def test_weights_of_another_network(self, data, tmp_path, flag):
        torch.save(nn.Conv2d(1, 1, 3).state_dict(), tmp_path / "other.pth")
        message = "weights only" if flag == "--resume" else "not a StackMFF-V2 checkpoint"
        with pytest.raises(InputError, match=message):
            train.main(tiny_args(data, tmp_path, flag, str(tmp_path / "other.pth")))
        assert not (tmp_path / "run").exists()

    def test_missing_file(self, data, tmp_path):
        with pytest.raises(InputError, match="does not exist"):
            train.main(tiny_args(data, tmp_path, "--resume", str(tmp_path / "gone.pth")))


def test_killed_during_epoch_two_leaves_a_loadable_checkpoint_and_resumes(data, tmp_path):
    """A real SIGTERM to train.py while epoch 2 of 3 runs: exit 130 with one line,
    last.pth (epoch 1) loads with load_model, --resume runs epochs 2 and 3."""
    import os
    import signal
    import time
    argv = ["--train_dataset", *data["train"], "--val_dataset", *data["val"], "--training_image_size", "64",
            "--batch_size", "2", "--num_epochs", "3", "--num_workers", "0", "--num_threads", "1",
            "--device", "cpu", "--save_dir", str(tmp_path), "--save_name", "run"]
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = tmp_path / "run" / "last.pth"
    deadline = time.monotonic() + 120
    while process.poll() is None and not last.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)   # into epoch 2: epoch 1 wrote last.pth as it ended
    assert process.poll() is None, "training ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].strip() == "interrupted"
    assert "epoch 2/3: train loss" not in stdout
    assert not [p for p in (tmp_path / "run").rglob("*") if ".part" in p.name]
    assert torch.load(last, weights_only=True)["epoch"] == 1
    load_model(last, "cpu")

    summary = train.main(train.get_args_parser().parse_args(argv + ["--resume", str(last)]))
    assert [h["epoch"] for h in summary["history"]] == [2, 3]
    assert torch.load(last, weights_only=True)["epoch"] == 3
    with open(tmp_path / "run" / "validation.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]
