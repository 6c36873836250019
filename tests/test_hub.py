"""Hub upload errors: the server's text is shown, never a credential it echoes back."""

import pytest

from keras_dinov2.backbone import DINOv2Backbone
from keras_dinov2.cli import main
from keras_dinov2.export import UploadError, push_to_hub
from keras_dinov2.export.hub import redact_secrets

# Upload and redaction do not touch the backend: one job runs them (see conftest).
pytestmark = pytest.mark.once

huggingface_hub = pytest.importorskip("huggingface_hub")

TOKEN = "hf_" + "Zq3xLm9TbV2kR8wPn4YcJd7H"  # made up; the shape of a real one


@pytest.mark.parametrize("text", [
    f"401 Client Error: Unauthorized (token {TOKEN})",
    "request headers {'authorization': 'Bearer sk_live_51HxyzAbCdEf'}",
    "Authorization: Bearer abc.def.ghi",
    "failed with token=s3cr3tvalue&retry=1",
    "signature 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 rejected",
    "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N rejected",
])
def test_redact_secrets_removes_what_looks_like_a_credential(text):
    redacted = redact_secrets(text)
    assert "[redacted]" in redacted
    for secret in (TOKEN, "sk_live_51HxyzAbCdEf", "abc.def.ghi", "s3cr3tvalue",
                   "9f86d081884c7d659a2feaa0c55ad015", "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in redacted


def test_redact_secrets_keeps_ordinary_text():
    for text in (
        "404 Client Error: Repository Not Found for url: https://huggingface.co/api/repos/create",
        "No space left on device: '/tmp/pytest-of-root/pytest-12/test_export_folder0/model.weights.h5'",
        "Could not create the branch 'v1' of tester/dinov2-tiny (ConnectionError)",
    ):
        assert redact_secrets(text) == text
    # A known secret goes wherever it appears, whatever it looks like.
    assert redact_secrets("echo: plainword", secrets=["plainword"]) == "echo: [redacted]"


class _RefusingApi:
    """A stand-in for huggingface_hub.HfApi whose server echoes the request's credentials in its error."""

    def __init__(self, endpoint=None, token=None):
        self.endpoint = endpoint or "https://huggingface.co"
        self.token = token

    def create_repo(self, *args, **kwargs):
        raise RuntimeError(
            f"500 Server Error for url https://huggingface.co/api/repos/create; request headers "
            f"{{'authorization': 'Bearer {self.token}'}}, body token={self.token}"
        )


def test_push_error_shows_the_server_text_without_the_token(tmp_path, monkeypatch):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "HfApi", _RefusingApi)
    with pytest.raises(UploadError) as caught:
        push_to_hub(str(tmp_path / "export"), "hf://tester/x", token=TOKEN)
    message = str(caught.value)
    assert "500 Server Error" in message and "[redacted]" in message
    assert TOKEN not in message and TOKEN[3:] not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no traceback echo


def test_cli_export_push_error_never_prints_the_token(tmp_path, monkeypatch, capsys):
    preset = tmp_path / "preset"
    DINOv2Backbone.from_preset("dinov2_vit_tiny4", load_weights=False).save_to_preset(str(preset))
    monkeypatch.setattr(huggingface_hub, "HfApi", _RefusingApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = main(["export", "--preset", str(preset), "--out", str(tmp_path / "out"),
                 "--push", "hf://tester/x"])
    captured = capsys.readouterr()
    assert code == 3
    assert "500 Server Error" in captured.err
    assert TOKEN not in captured.err + captured.out and TOKEN[3:] not in captured.err + captured.out
