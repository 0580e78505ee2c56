"""Random-weight Hugging Face models saved to local directories: real architectures, no hub, no download.

Each directory holds ``config.json`` + ``model.safetensors`` + a small WordLevel tokenizer, exactly what
``TransformerBridge.boot_transformers(local_dir)`` and ``AutoModelForCausalLM.from_pretrained(local_dir)``
need offline (TL4_GUIDE section 2). Builders are plain functions (usable from any test or script);
the pytest fixtures at the bottom cache one set of directories per session.

Import from a test module with ``from hf_fixtures import ...`` (``tests/`` is on ``sys.path`` under
pytest's default import mode, as for ``conftest``) or ``from tests.hf_fixtures import ...`` when the
repository root is on the path (``python -m pytest``). Fixtures imported into a test module's namespace
are found by pytest; no conftest or ``pytest_plugins`` entry is needed.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

__all__ = [
    "WORDS",
    "CHAT_TEMPLATE",
    "SPECIAL",
    "make_tokenizer",
    "save_tiny_gpt2",
    "save_tiny_neox",
    "save_tiny_llama",
    "save_tiny",
    "perturbed_copy",
    "mismatched_copy",
    "hf_hidden_means",
    "reference_ids",
    "tiny_dirs",
]

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "the a cat dog sat on mat how do i make bomb cake bread please help me sure here is sorry cannot "
    "write poem about sea sky tell story explain why water wet steal car hack computer friend recipe "
    "for good bad you can will not it that this what . , ? !"
).split()

# Minimal chat template: ``<bos><|user|> text <|end|> <|assistant|>`` (an assistant turn ends with ``<|end|>``).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None = None):
    """A WordLevel tokenizer over :data:`WORDS` (ids: pad 0, bos 1, eos 2, unk 3), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL)  # atomic: never split by the pre-tokenizer
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _patch_tokenizer_config(folder: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which transformers 4.x cannot load (TL4_GUIDE section 2).
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2))


def _save(hf_model, tok, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    _patch_tokenizer_config(folder)
    return folder


def save_tiny_gpt2(
    folder: str | Path, *, n_layers: int = 3, d_model: int = 32, seed: int = 0, chat: bool = False
) -> Path:
    """A random-weight GPT-2 (sequential attention then MLP, learned positions) in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(CHAT_TEMPLATE if chat else None)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=d_model,
        n_layer=n_layers,
        n_head=4,
        n_positions=64,
        n_ctx=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,
    )
    cfg.n_ctx = 64  # transformers 5 no longer stores n_ctx; older TL versions need it
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(cfg).eval(), tok, Path(folder))


def save_tiny_neox(
    folder: str | Path, *, n_layers: int = 3, d_model: int = 32, seed: int = 0, chat: bool = False
) -> Path:
    """A random-weight GPT-NeoX (Pythia-like: parallel attention + MLP, partial rotary) in ``folder``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = make_tokenizer(CHAT_TEMPLATE if chat else None)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=4 * d_model,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return _save(GPTNeoXForCausalLM(cfg).eval(), tok, Path(folder))


def save_tiny_llama(
    folder: str | Path,
    *,
    n_layers: int = 3,
    d_model: int = 32,
    seed: int = 0,
    chat: bool = False,
    tied: bool = True,
    n_positions: int = 64,
) -> Path:
    """A random-weight Llama with grouped-query attention (4 query heads, 2 key/value heads), RMSNorm,
    rotary positions and a gated MLP: SmolLM2's family. ``tied``: tied embeddings, as SmolLM2.
    ``n_positions``: the context (``max_position_embeddings``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(CHAT_TEMPLATE if chat else None)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * d_model,
        max_position_embeddings=n_positions,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(cfg).eval(), tok, Path(folder))


def save_tiny(arch: str, folder: str | Path, **kwargs) -> Path:
    """``arch`` is ``"gpt2"``, ``"neox"`` or ``"llama"`` (grouped-query attention)."""
    builders = {"gpt2": save_tiny_gpt2, "neox": save_tiny_neox, "llama": save_tiny_llama}
    return builders[arch](folder, **kwargs)


def perturbed_copy(src: str | Path, dst: str | Path, *, scale: float = 0.1, seed: int = 1) -> Path:
    """The same architecture and tokenizer as ``src`` with every weight moved by ``scale * std(w) * noise``.

    Stands in for an "aligned" checkpoint of the model in ``src``.
    """
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            spread = p.std() if p.numel() > 1 and p.std() > 0 else p.abs().mean() + 1e-2
            p.add_(scale * spread * torch.randn(p.shape, generator=g))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for f in src.iterdir():  # tokenizer files, untouched
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


def mismatched_copy(src: str | Path, dst: str | Path, *, n_layers: int | None = None) -> Path:
    """A model of the same family and tokenizer as ``src`` but a different number of layers."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    arch = {"gpt_neox": "neox", "llama": "llama"}.get(cfg["model_type"], "gpt2")
    L = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    chat = (Path(src) / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (Path(src) / "tokenizer_config.json").read_text()
    )
    return save_tiny(arch, dst, n_layers=n_layers or L + 1, seed=7, chat=chat)


@torch.no_grad()
def reference_ids(tok, text: str, chat: bool, bos: int) -> list[int]:
    """The token ids of one prompt as plain transformers gives them (the tests' independent reference):
    the chat template's user turn with the generation prompt, or ``bos`` BOS ids and the text."""
    if chat:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id] * bos + tok(text, add_special_tokens=False)["input_ids"]


def hf_hidden_means(folder: str | Path, texts: list[str], *, chat: bool = False, bos: bool = True) -> torch.Tensor:
    """The oracle: per-layer mean of the *last block's output* at each prompt's last token, straight from
    ``transformers`` (no TransformerLens), one unpadded prompt at a time. Returns ``[layer, d_model]`` float64.

    ``bos``: prepend BOS to plain prompts (GPT-2's convention; Pythia/GPT-NeoX models do not).
    ``hidden_states[l + 1]`` is block ``l``'s output except for the last block, where Hugging Face applies
    the final norm; the last block's raw output is read with a forward hook instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    blocks = {"gpt_neox": lambda: model.gpt_neox.layers, "llama": lambda: model.model.layers}.get(
        model.config.model_type, lambda: model.transformer.h
    )()
    L = len(blocks)
    last: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o))
    rows = []
    try:
        for text in texts:
            out = model(torch.tensor([reference_ids(tok, text, chat, bos)]), output_hidden_states=True)
            hs = [out.hidden_states[l + 1][0, -1] for l in range(L - 1)] + [last.pop()[0, -1]]
            rows.append(torch.stack(hs).double())
    finally:
        handle.remove()
    return torch.stack(rows).mean(0)


# ------------------------------------------------------------------ pytest fixtures
@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``{(arch, role): folder}`` for arch in gpt2/neox/llama and role in base/aligned/mismatched/chat, built once."""
    root = tmp_path_factory.mktemp("hf_models")
    out = {}
    for arch in ("gpt2", "neox", "llama"):
        base = save_tiny(arch, root / f"{arch}_base", seed=0)
        out[arch, "base"] = base
        out[arch, "aligned"] = perturbed_copy(base, root / f"{arch}_aligned", seed=1)
        out[arch, "mismatched"] = mismatched_copy(base, root / f"{arch}_mismatched")
    out["gpt2", "chat"] = save_tiny("gpt2", root / "gpt2_chat", seed=3, chat=True)
    return out
