"""`python -m act`: fit-text and generate on a tiny Llama, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from text_models import save_tiny_gpt2, save_tiny_llama

from act import Transport
from act.text.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ["The shop closes at six.", "She finished reading the novel.", "The bus was late."]
TARGET = ["The waves rolled in.", "Whales migrate across the ocean.", "The tide came in."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    paths = {
        "llama": save_tiny_llama(folder / "llama"),
        "wide": save_tiny_llama(folder / "wide", hidden=48),
        "gpt2": save_tiny_gpt2(folder / "gpt2"),
        "source": folder / "source.txt",
        "target": folder / "target.txt",
        "prompts": folder / "prompts.txt",
        "empty": folder / "empty.txt",
        "broken": folder / "broken.safetensors",
        "notes": folder / "notes.txt",
    }
    paths["source"].write_text("\n".join(SOURCE) + "\n\n")
    paths["target"].write_text("\n".join(TARGET))
    paths["prompts"].write_text("The sea\nShe finished\n")
    paths["empty"].write_text("\n  \n")
    paths["broken"].write_bytes(b"not a safetensors file")
    paths["notes"].write_text("Some notes, not a transport.\n" * 20)
    paths["truncated"] = folder / "truncated"
    shutil.copytree(paths["llama"], paths["truncated"])
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for name, model, extra in (
        ("transport", "llama", []),
        ("gpt2_transport", "gpt2", ["--causal", "--method", "mean"]),
    ):
        paths[name] = folder / f"{name}.safetensors"
        code = main(
            ["fit-text", "--model", str(paths[model]), "--source", str(paths["source"]),
             "--target", str(paths["target"]), "--support", "all", "--out", str(paths[name]),
             *extra]
        )  # fmt: skip
        assert code == 0
    return paths


def _generate(files, *extra):
    return [
        "generate", "--model", str(files["llama"]), "--prompts", str(files["prompts"]),
        "--max-new-tokens", "4", "--temperature", "1", "--seed", "5", *extra,
    ]  # fmt: skip


def test_fit_text_writes_a_transport_for_the_models_attention_outputs(files):
    from act.transport import Transport

    transport = Transport.load(files["transport"])
    assert transport.sites == ["model.layers.1.self_attn.o_proj"]
    assert transport.support == "all" and transport.source_samples == 3
    assert transport.info["source"] == str(files["source"])
    causal = Transport.load(files["gpt2_transport"])
    assert causal.causal and causal.method == "mean" and len(causal.sites) == 5


def test_generate_json_lines_and_strength_zero_equals_plain(files, capsys):
    assert main([*_generate(files), "--json"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*_generate(files), "--json", "--transport", str(files["transport"]),
                 "--strength", "0"]) == 0  # fmt: skip
    steered = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["prompt"] for row in steered] == ["The sea", "She finished"]
    assert [row["strength"] for row in steered] == [0.0, 0.0]
    assert [row["output"] for row in steered] == [row["output"] for row in plain]
    assert main([*_generate(files), "--transport", str(files["transport"]), "--chat"]) == 0
    assert capsys.readouterr().out.startswith("> The sea\n")


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--source", "missing.txt"], 1, "file 'missing.txt' not found"),
        (["--source", "{empty}"], 1, "is empty"),
        (["--support", "q70"], 1, "unknown support 'q70'"),
        (["--out", "transport.pt"], 1, "must end with .safetensors"),
        (["--method", "best"], 2, "invalid choice: 'best'"),
        (["--steps", "3"], 1, "--steps apply to --method end-to-end only, not to linear"),
        (["--method", "end-to-end", "--steps", "0"], 1, "steps must be at least 1, got 0"),
        (["--method", "end-to-end", "--sparsity", "inf"], 1, "--sparsity must be a finite"),
        (["--method", "end-to-end", "--init", "zero"], 2, "invalid choice: 'zero'"),
    ],
)
def test_fit_text_errors_are_one_line(files, capsys, tmp_path, arguments, code, message):
    options = {"--source": str(files["source"]), "--target": str(files["target"]),
               "--out": str(tmp_path / "t.safetensors")}  # fmt: skip
    for flag, value in zip(arguments[::2], arguments[1::2], strict=True):
        options[flag] = value.format(empty=files["empty"])
    argv = ["fit-text", "--model", str(files["llama"]), *sum(options.items(), ())]
    _assert_one_line_error(argv, capsys, code, message)


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--strength", "strong"], 2, "invalid float value: 'strong'"),
        (["--strength", "nan"], 1, "--strength must be a finite number, got nan"),
        (["--strength", "inf", "--transport", "{transport}"], 1, "must be a finite number"),
        (["--strength", "1e308", "--transport", "{transport}"], 1, "overflows float32"),
        (["--top-p", "nan"], 1, "--top-p must be a finite number"),
        (["--transport", "{gpt2_transport}"], 1, "module 'transformer.h.0.ln_1' not found"),
        (["--transport", "{transport}", "--model", "{wide}"], 1, "fitted on LlamaForCausalLM"),
        (["--transport", "{broken}"], 1, "broken.safetensors"),
        (["--transport", "missing.safetensors"], 1, "missing.safetensors"),
        (["--prompts", "{empty}"], 1, "is empty"),
        (["--model", "./no/such/model"], 1, "model folder './no/such/model' does not exist"),
        (["--model", "nosuch/model"], 1, "cannot load model 'nosuch/model'"),
        (["--model", "{truncated}"], 1, "cannot load model"),
        (["--transport", "{notes}"], 1, "is not a safetensors transport file"),
        (["--strength", "1"], 1, "--strength needs --transport"),
        (["--max-new-tokens", "0"], 1, "--max-new-tokens must be at least 1, got 0"),
        (["--threads", "0"], 1, "--threads must be at least 1, got 0"),
        (["--prompt", "hi"], 2, "not allowed with argument --prompts"),
    ],
)
def test_generate_errors_are_one_line(files, capsys, arguments, code, message):
    argv = _generate(files, *(a.format(**{k: str(v) for k, v in files.items()}) for a in arguments))
    _assert_one_line_error(argv, capsys, code, message)


def _assert_one_line_error(argv, capsys, code, message):
    try:
        exit_code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        exit_code = stop.code
    err = capsys.readouterr().err
    assert exit_code == code
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    return err


def test_an_empty_prompt_is_one_line(files, capsys):
    argv = ["generate", "--model", str(files["llama"]), "--prompt", "  "]
    _assert_one_line_error(argv, capsys, 1, "--prompt is empty")


def test_without_a_command_the_commands_are_listed(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(f"  {name} " in err for name in ("demo", "fit-text", "generate"))


def test_every_option_has_help_text():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_the_goal_picks_the_settings_and_explicit_options_win(files, tmp_path):
    base = ["fit-text", "--model", str(files["llama"]), "--source", str(files["source"]),
            "--target", str(files["target"])]  # fmt: skip
    cases = [
        ([], ("linear", "all", "mean")),
        (["--goal", "detox"], ("mean", "range", "mean")),  # the measured detox default
        (["--goal", "detox", "--support", "q05"], ("mean", "q05", "mean")),
        (["--goal", "detox", "--method", "linear", "--pooling", "tokens"],
         ("linear", "range", "tokens")),
    ]  # fmt: skip
    for index, (extra, (method, support, pooling)) in enumerate(cases):
        out = tmp_path / f"{index}.safetensors"
        assert main([*base, *extra, "--out", str(out)]) == 0
        transport = Transport.load(out)
        assert (transport.method, transport.support) == (method, support)
        assert transport.info["pooling"] == pooling
        assert transport.info["goal"] == ("detox" if extra else "concept")


def test_fit_text_end_to_end_takes_its_settings_and_reports_the_loss(files, tmp_path, capsys):
    out = tmp_path / "joint.safetensors"
    argv = ["fit-text", "--model", str(files["llama"]), "--source", str(files["source"]),
            "--target", str(files["target"]), "--goal", "detox", "--method", "end-to-end",
            "--steps", "3", "--learning-rate", "0.05", "--sparsity", "0.01", "--init",
            "identity", "--seed", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    transport = Transport.load(out)
    assert (transport.method, transport.support) == ("end-to-end", "range")
    settings = transport.info["end-to-end"]
    given = {"steps": 3, "learning_rate": 0.05, "sparsity": 0.01, "init": "identity", "seed": 4}
    assert {key: settings[key] for key in given} == given
    assert "loss (summed W2^2 / scale^2 over layers): plain model" in capsys.readouterr().out
    argv[argv.index("--out") + 1] = str(tmp_path / "causal.safetensors")
    message = "--causal does not apply to --method end-to-end"
    _assert_one_line_error([*argv, "--causal"], capsys, 1, message)


def test_layer_errors_suggest_text_presets_only(files, capsys, tmp_path):
    argv = ["fit-text", "--model", str(files["llama"]), "--source", str(files["source"]),
            "--target", str(files["target"]), "--layers", "nothing", "--out",
            str(tmp_path / "t.safetensors")]  # fmt: skip
    err = _assert_one_line_error(argv, capsys, 1, "presets: attention-output")
    assert "unet-norms" not in err and "flux-blocks" not in err


def test_python_m_act_exits_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "act", "generate", "--model", str(tmp_path / "none"),
         "--prompt", "hi"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert (
        lines[0]
        == f"python -m act generate: error: model folder '{tmp_path / 'none'}' does not exist"
    )


def test_demo_prints_both_tables(files, capsys, monkeypatch):
    import act.text.demo
    from act.text.models import load_causal_lm

    monkeypatch.setattr(
        act.text.demo, "load_causal_lm", lambda name: load_causal_lm(files["llama"])
    )
    assert main(["demo", "--rows", "2", "--concept", "ocean"]) == 0
    out = capsys.readouterr().out
    assert "| prompt | λ = 0 | toxic words | λ = 1 | toxic words |" in out
    assert "| prompt | λ = 0 | ocean words | λ = 1 | ocean words |" in out
    assert "Over all 48 prompts" in out and "Over all 8 prompts" in out
    assert "Fit time:" in out
    _assert_one_line_error(["demo", "--concept", "sailing"], capsys, 1, "unknown concept")


def test_demo_cells_show_the_words_they_count_even_when_cut():
    import re

    from act.text.demo import _cell, _score

    words = re.compile(r"\b(idiot|stupid)\b", re.IGNORECASE)
    text = "a " * 60 + "you Stupid idiot, stupid"
    assert "idiot" not in _cell(text)  # the cut hides them ...
    assert _score(words, text) == "3: stupid, idiot"  # ... the score cell names them
    assert _score(words, "all fine") == "0"
