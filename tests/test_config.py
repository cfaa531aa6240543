"""config.json validation: whatever a config holds, config_from_dict either builds a Config or raises one
PhinanoError that names the key at fault. Corrupted copies of released-shaped configs are the test data."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import phinano
from phinano import PhinanoError
from phinano.config import config_from_dict, load_sampling_defaults, load_stop_ids

NANO = Path(phinano.__file__).parent / "nano"

# Released config.json contents (the fields phinano reads and a few it ignores), factor lists at their real
# length with made-up values.
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    "hidden_act": "silu", "attention_bias": False,
}
PHI35_MINI = {
    **PHI3_MINI_4K, "max_position_embeddings": 131072, "sliding_window": 262144,
    "rope_scaling": {"type": "longrope", "short_factor": [1.05] * 48, "long_factor": [1.08] + [9.0] * 47},
}
PHI35_MOE = {
    **PHI3_MINI_4K, "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "hidden_size": 4096,
    "intermediate_size": 6400, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "sliding_window": 131072, "attention_bias": True, "lm_head_bias": True, "num_local_experts": 16,
    "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.5] * 64,
                     "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
                     "original_max_position_embeddings": 4096},
}
PHI4_MINI = {
    **PHI35_MINI, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
    "partial_rotary_factor": 0.75, "tie_word_embeddings": True, "bos_token_id": 199999,
    "eos_token_id": 199999, "pad_token_id": 199999,
}
BASES = {
    "phi3-mini-4k": PHI3_MINI_4K,
    "phi3.5-mini": PHI35_MINI,
    "phi3.5-moe": PHI35_MOE,
    "phi4-mini": PHI4_MINI,
    # Transformers 5's spelling (rope_parameters, dtype), as the shipped nano models were saved
    "nano-phi3": json.loads((NANO / "nano-phi3" / "config.json").read_text()),
    "nano-phimoe": json.loads((NANO / "nano-phimoe" / "config.json").read_text()),
}

# Keys phinano reads that the bases may not set: corrupting "nothing" into a bad value must be caught too.
OPTIONAL_TOP = ["head_dim", "partial_rotary_factor", "num_local_experts", "num_experts_per_tok",
                "router_jitter_noise", "lm_head_bias", "dtype", "rope_parameters", "rope_scaling",
                "original_max_position_embeddings", "architectures", "model_type"]
OPTIONAL_ROPE = ["attention_factor", "factor", "short_mscale", "long_mscale", "rope_type", "type",
                 "partial_rotary_factor", "original_max_position_embeddings", "rope_theta"]

WRONG = st.one_of(
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.integers(-3, 3),  # zero and negative sizes, small sizes that no longer divide
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-2, 64), max_size=3),
    st.lists(st.text(max_size=2), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def corrupted(draw):
    """(config, names of the keys changed): 1 to 3 keys, top-level or inside the rope dict, given wrong values
    (or removed, or factor lists turned into lists of strings)."""
    config = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        rope_name = next((k for k in ("rope_parameters", "rope_scaling") if isinstance(config.get(k), dict)), None)
        inside = rope_name is not None and draw(st.booleans())
        target = config[rope_name] if inside else config
        key = draw(st.sampled_from(sorted(set(target) | set(OPTIONAL_ROPE if inside else OPTIONAL_TOP))))
        action = draw(st.sampled_from(["wrong", "wrong", "remove", "strings"]))
        if action == "remove":
            target.pop(key, None)
        elif action == "strings" and isinstance(target.get(key), list):
            target[key] = [str(v) for v in target[key]]
        else:
            target[key] = draw(WRONG)
        changed.append(key)
    return config, changed


@settings(max_examples=600, deadline=None)
@given(corrupted())
def test_any_corruption_is_a_config_or_one_error_naming_the_key(case):
    config, changed = case
    try:
        config_from_dict(config)
    except PhinanoError as e:  # any other exception fails the test
        message = str(e)
        assert message.startswith("config.json: ") and "\n" not in message
        assert any(re.search(rf"['.]{re.escape(key)}'", message) for key in changed), (changed, message)


def test_the_bases_are_valid():
    for name, config in BASES.items():
        assert config_from_dict(config).architecture in ("Phi3ForCausalLM", "PhimoeForCausalLM"), name


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", "x", "config.json: 'hidden_size' must be a positive integer, got 'x'"),
    ("hidden_size", 0, "'hidden_size' must be a positive integer, got 0"),
    ("num_hidden_layers", True, "'num_hidden_layers' must be a positive integer, got True"),
    ("vocab_size", [32064], "'vocab_size' must be a positive integer, got [32064]"),
    ("rope_scaling", 7, "'rope_scaling' must be an object, got 7"),
    ("hidden_size", 3000, "'hidden_size' (3000) must be a multiple of 'num_attention_heads' (32)"),
    ("num_key_value_heads", 5, "'num_attention_heads' (32) must be a multiple of 'num_key_value_heads' (5)"),
    ("rms_norm_eps", float("nan"), "'rms_norm_eps' must be a positive number, got nan"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false, got 'false'"),
    ("eos_token_id", [32000, "32007"], "'eos_token_id' must be a token id or a list of token ids"),
    ("partial_rotary_factor", 1.5, "'partial_rotary_factor' must be a number in (0, 1], got 1.5"),
    ("hidden_act", "gelu", "'hidden_act' must be \"silu\""),  # Transformers would run gelu; phinano runs SwiGLU
    ("hidden_act", 0, "'hidden_act'"),
    ("sliding_window", 2**64 - 1, "'sliding_window' must be an integer below 2^31"),  # was: OverflowError in attention
    ("max_position_embeddings", 2**40, "'max_position_embeddings' must be an integer below 2^31"),
])
def test_messages(key, value, message):
    with pytest.raises(PhinanoError) as e:
        config_from_dict({**PHI35_MINI, key: value})
    assert message in str(e.value)


def test_rope_messages_name_the_nested_key():
    def error(**rope):
        with pytest.raises(PhinanoError) as e:
            config_from_dict({**PHI35_MINI, "rope_scaling": {**PHI35_MINI["rope_scaling"], **rope}})
        return str(e.value)

    assert "'rope_scaling.short_factor' must be a list of positive numbers, got ['1.0'" in error(
        short_factor=["1.0"] * 48)
    assert "'rope_scaling.long_factor' has 47 entries, expected 48" in error(long_factor=[1.0] * 47)
    assert "'rope_scaling.type' must be one of default, longrope, su, got 'yarn'" in error(type="yarn")
    assert "'short_mscale' and 'long_mscale' must be given together" in error(short_mscale=1.2)
    phi4 = {**PHI4_MINI, "partial_rotary_factor": 0.5}  # 64 rotary dims: the 48 factors no longer fit
    with pytest.raises(PhinanoError, match="expected 32 .*'partial_rotary_factor' 0.5"):
        config_from_dict(phi4)
    with pytest.raises(PhinanoError, match="'rope_parameters.rope_theta' must be a positive number"):
        config_from_dict({**PHI3_MINI_4K, "rope_parameters": {"rope_theta": -1.0, "rope_type": "default"}})


def test_moe_values():
    with pytest.raises(PhinanoError, match="'num_experts_per_tok' must be 2"):
        config_from_dict({**PHI35_MOE, "num_experts_per_tok": 3})
    with pytest.raises(PhinanoError, match="'num_local_experts' must be an integer >= 2, got 1"):
        config_from_dict({**PHI35_MOE, "num_local_experts": 1})
    with pytest.raises(PhinanoError, match="'router_jitter_noise' must be a number >= 0"):
        config_from_dict({**PHI35_MOE, "router_jitter_noise": -0.01})


def test_null_means_not_given():
    """Transformers writes null for unset values (sliding_window, pad_token_id, head_dim): the defaults apply."""
    c = config_from_dict({**PHI3_MINI_4K, "sliding_window": None, "pad_token_id": None, "head_dim": None,
                          "num_key_value_heads": None})
    assert (c.sliding_window, c.pad_token_id, c.head_dim, c.num_key_value_heads) == (None, None, 96, 32)


def test_files_that_are_not_objects_or_have_bad_generation_values(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(PhinanoError, match="config.json: must hold a JSON object, got list"):
        phinano.load(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": "0.9"}))
    with pytest.raises(PhinanoError, match="generation_config.json: 'top_p' must be a number >= 0, got '0.9'"):
        load_sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": "yes"}))
    with pytest.raises(PhinanoError, match="'do_sample' must be true or false"):
        load_sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, None]}))
    with pytest.raises(PhinanoError, match="generation_config.json: 'eos_token_id' must be a token id"):
        load_stop_ids(tmp_path, config_from_dict(PHI3_MINI_4K))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 40}))
    assert load_sampling_defaults(tmp_path) == {"temperature": 1.0, "top_k": 40}
