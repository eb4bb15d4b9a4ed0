"""The `tandem` command as a user runs it: a real subprocess, output parsed from stdout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams


def tandem(*args: str, env_cache=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_tiny_model_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert tandem("make-tiny-model", str(a)).returncode == 0
    assert tandem("make-tiny-model", str(b)).returncode == 0
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        names
    )
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    size = sum(p.stat().st_size for p in a.iterdir())
    assert size < 8 * 2**20
    again = tandem("make-tiny-model", str(a))
    assert again.returncode != 0 and "not empty" in again.stderr


def test_generate_json_matches_engine(tiny_model_dir, tmp_path):
    prompts = [[5, 9, 1, 77, 3], [42] * 30, [7]]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    run = tandem(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts-file",
        str(ids_file),
        "--ids",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    engine = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu"))
    params = SamplingParams(temperature=0.0, max_tokens=6)
    expected = engine.generate(prompts, params)
    assert [line["token_ids"] for line in lines] == [c.token_ids for c in expected]
    assert [line["text"] for line in lines] == [c.text for c in expected]

    single = tandem(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt-ids",
        "5,9,1,77,3",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    )
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout)["token_ids"] == expected[0].token_ids


def test_generate_text_prompt_uses_the_tokenizer(tiny_model_dir):
    run = tandem(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "Hello <|start|> world",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["token_ids"]) <= 3 and out["usage"]["prompt_tokens"] > 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,x", "--max-tokens", "2"], "--prompt-ids"),
        (["--prompt-ids", "1,2", "--max-tokens", "0"], "max_tokens"),
        (["--prompt-ids", "1,2", "--max-tokens", "2", "--temperature", "-1"], "temperature"),
        (["--prompt-ids", "1,2", "--max-tokens", "2", "--top-p", "0"], "top_p"),
        (["--prompt-ids", "99999999", "--max-tokens", "2"], "prompt"),
    ],
)
def test_generate_rejects_bad_input_naming_it(tiny_model_dir, args, message):
    run = tandem("generate", "--model", str(tiny_model_dir), *args)
    assert run.returncode != 0
    assert message in run.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path):
    run = tandem(
        "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--max-tokens", "1"
    )
    assert run.returncode != 0 and "is not a directory" in run.stderr
