"""A model served by Triton Inference Server as an Embedder backend: ``--model triton://host:8000/NAME``.

NEVER EXECUTED against a server here (no Triton on the development machines): written against tritonclient's
documented HTTP API (``InferenceServerClient.get_model_config``, ``InferInput.set_data_from_numpy``, ``infer``,
``InferResult.as_numpy``); tests/deploy/test_embedder_triton.py runs only where ``CTXSIM_TRITON_URL`` names a server
serving a repository written by ``ctxsim export --triton``.

The preprocessing contract and the model fingerprint come from the model's config: ``ctxsim export --triton``
writes the export contract as the config.pbtxt parameter ``ctxsim_contract`` (JSON), so an index built with
``model.onnx`` in-process and queried through Triton (or the other way round) is checked by the same fingerprint.
Images are decoded and preprocessed here; Triton runs the network (input "images", output "embeddings").
"""
from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export.contract import contract_preprocess
from ctxsim.export.triton import CONTRACT_PARAMETER

__all__ = ["CONTRACT_PARAMETER", "TritonBackend", "is_triton_url", "parse_triton_url"]

_URL = re.compile(r"^triton:/{1,2}(?P<host>[^/]+)/(?P<name>[^/]+)(?:/(?P<version>\d+))?/?$")


def is_triton_url(model: Any) -> bool:
    """Whether ``model`` names a Triton model (``triton://host:port/name``; a Path keeps one slash of the two)."""
    return str(model).startswith("triton:/")


def parse_triton_url(url: str) -> tuple[str, str, str]:
    """(host:port, model name, version or "") of ``triton://host:port/name[/version]``; ConfigError otherwise."""
    m = _URL.match(str(url))
    if not m:
        raise ConfigError(f"a Triton model is triton://host:port/NAME[/VERSION], got {url!r}")
    return m["host"], m["name"], m["version"] or ""


class TritonBackend:
    """The Embedder backend of a Triton-served ctxsim model (HTTP; see the module docstring)."""

    def __init__(self, url: str) -> None:
        try:
            import tritonclient.http as httpclient
        except ImportError:
            raise MissingDependency("triton:// models need tritonclient: pip install 'tritonclient[http]'") from None
        self._http = httpclient
        self.url, self.model, self.version = parse_triton_url(url)
        self.canonical = f"triton://{self.url}/{self.model}" + (f"/{self.version}" if self.version else "")
        self.client = httpclient.InferenceServerClient(url=self.url)
        try:
            config = self.client.get_model_config(self.model, self.version)
        except Exception as e:  # noqa: BLE001 - connection refused, unknown model: tritonclient raises its own types
            raise ArtifactError(f"cannot read the config of {self.canonical} ({e}); is the server up and the model "
                                "loaded?") from None
        raw = ((config.get("parameters") or {}).get(CONTRACT_PARAMETER) or {}).get("string_value")
        if not raw:
            raise ArtifactError(f"{self.canonical} has no {CONTRACT_PARAMETER} parameter in its config: write the "
                                "repository with this ctxsim's `ctxsim export --triton`")
        try:
            contract = json.loads(raw)
        except ValueError:
            contract = None
        if not isinstance(contract, dict):
            raise ArtifactError(f"{self.canonical}: {CONTRACT_PARAMETER} is not a JSON object; re-export the "
                                "repository with `ctxsim export --triton`")
        self.contract: dict[str, Any] = contract
        self.fingerprint = str(self.contract.get("fingerprint") or "")
        if not self.fingerprint:
            raise ArtifactError(f"{self.canonical}'s contract records no model fingerprint; re-export it")
        self.name = "triton"
        self.device = "cpu"  # where this process's tensors live; the network runs on the server
        dim = self.contract.get("embedding_dim")
        self.dim = int(dim) if dim else None
        self.preprocess_spec = contract_preprocess(self.contract)

    def preprocess(self, images: list[Any]) -> np.ndarray:
        from ctxsim.export.contract import preprocess_batch

        return preprocess_batch(images, self.contract)

    def run(self, batch: Any) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(batch), dtype=np.float32)
        inp = self._http.InferInput(self.contract.get("input_name", "images"), list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out_name = self.contract.get("output_name", "embeddings")
        res = self.client.infer(self.model, inputs=[inp], model_version=self.version,
                                outputs=[self._http.InferRequestedOutput(out_name)])
        return np.asarray(res.as_numpy(out_name), dtype=np.float32)
