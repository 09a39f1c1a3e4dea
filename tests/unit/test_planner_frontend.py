"""Front-end helpers of the planner: the API-key-name check and the plan trace text."""

from __future__ import annotations

import json

import pytest

from mepg_core.planner.backends import CallableBackend
from mepg_core.planner.chain import plan_with_backend
from mepg_core.planner.frontend import ApiKeyInValueError, check_api_key_env, describe_plan, looks_like_api_key


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "GROQ_API_KEY", "MY_SERVICE_TOKEN_2024", "hf_token",
                                  "_PRIVATE", "OLLAMA_KEY", "myKey"])
def test_variable_names_pass(name):
    assert not looks_like_api_key(name)
    assert check_api_key_env(f"  {name} ") == name


@pytest.mark.parametrize("key", ["sk-abc123", "sk-proj-4f9Qx2Lm8Zt7Rb1Vc6Nd3Kh5Jw0Ys", "sk_live_51HxYz",
                                 "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345", "gsk_0123456789abcdefghijKLMN",
                                 "aB3dE9fG1hJ2kL4mN6pQ8rS0tU", "0123456789abcdef0123456789abcdef",
                                 "Bearer abcdef", "xai-1234567890abcdef", "abcd-efgh-ijkl-mnop-qrst"])
def test_keys_are_refused_without_repeating_them(key):
    assert looks_like_api_key(key)
    with pytest.raises(ApiKeyInValueError, match="looks like an API key itself") as info:
        check_api_key_env(key)
    assert key not in str(info.value)


def test_empty_means_no_key_and_bad_names_are_errors():
    assert check_api_key_env("") is None and check_api_key_env("   ") is None and check_api_key_env(None) is None
    with pytest.raises(ValueError, match="must be the name of an environment variable"):
        check_api_key_env("MY KEY")
    with pytest.raises(ValueError, match="must be the name"):
        check_api_key_env("9LIVES")


def test_describe_offline_and_fallback_plans():
    text = describe_plan(plan_with_backend("two cats left of a dog", "offline"))
    assert text.startswith("path: offline\n") and "regions: 3" in text and "steps:" not in text

    answers = iter(["not json", json.dumps({"elements": []})] + ["{}"] * 10)
    result = plan_with_backend("two cats left of a dog", CallableBackend(lambda m: next(answers), name="fake"),
                               repair_rounds=0)
    text = describe_plan(result, notes=["a note"], has_adapter=True)
    assert "path: offline-fallback" in text and "backend: fake" in text
    assert "step 0 (analysis, LoRA on): failed after 1 attempt: $: no JSON object found" in text
    assert "step 2 (coordinates): skipped (step 1 failed)" in text
    assert text.endswith("  - a note")
    assert "LoRA on" not in describe_plan(result)
