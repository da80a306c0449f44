"""Hot reload for ``ctxsim serve``: a watched index folder's new generations, and the model that built them.

:class:`IndexWatcher` reads the folder's ``index.json`` every ``every_s`` seconds; when the generation changed
(``ctxsim index add``, or a rebuild), it loads the new generation in a thread (sha256-verified), checks that its
fingerprint is still the served model's, and swaps it into the batcher. With ``open_model`` (``serve
--follow-model``) a generation built with another model (a retrained model's rebuilt index) brings that model
along: it is opened from the path index.json records (refused when ``parity.json`` beside it says its parity check
failed) and the pair is swapped at once. A batch in flight finishes on the model and index it started with; a
generation that fails to load, or belongs to another model without ``open_model``, is refused once (logged, and
shown in ``/info``) and the previous one keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ctxsim.deploy.batcher import cancel_task
from ctxsim.errors import ConfigError

__all__ = ["IndexWatcher"]

logger = logging.getLogger(__name__)


class IndexWatcher:
    """Swaps the batcher's (model, index) pair for the folder's newest generation (see the module docstring)."""

    def __init__(self, folder: Any, batcher: Any, every_s: float, open_model: Any = None) -> None:
        self.folder, self.batcher = folder, batcher
        self.every_s = float(every_s)
        self.open_model = open_model  # path -> Embedder: follow a generation built with another model
        self.reloads = 0
        self.failures = 0
        self.refused: int | None = None  # a generation that failed: not retried until another one appears
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def generation(self) -> int:
        """The generation being served (the batcher's index)."""
        return int(self.batcher.index.info.generation)

    def stats(self) -> dict:
        return {"every_s": self.every_s, "generation": self.generation, "reloads": self.reloads,
                "failures": self.failures, "last_error": self.last_error}

    async def start(self) -> None:
        if self.every_s > 0:
            self._task = asyncio.create_task(self._loop(), name="ctxsim-index-watcher")

    async def stop(self) -> None:
        await cancel_task(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.check()

    async def check(self) -> bool:
        """Reload if ``index.json`` names another generation; True when the served index changed."""
        from ctxsim.deploy.index import load_index, read_index_info

        try:
            generation = read_index_info(self.folder).generation
        except Exception as e:  # noqa: BLE001 - mid-replacement or removed: keep serving what we have
            self.last_error = f"cannot read {self.folder}: {e}"
            return False
        if generation in (self.generation, self.refused):
            return False
        loop = asyncio.get_running_loop()
        embedder = self.batcher.embedder
        new = None
        try:
            new = await loop.run_in_executor(None, load_index, self.folder)
            if new.fingerprint != embedder.fingerprint and self.open_model is not None:
                embedder = await loop.run_in_executor(None, self._open_model_of, new)
            new.check_model(embedder.fingerprint)
        except Exception as e:  # noqa: BLE001 - a bad generation must not take the server down
            if new is not None:  # loaded, then refused: release what it holds (a Milvus client)
                new.close()
            self.refused, self.last_error = generation, f"generation {generation} refused: {e}"
            self.failures += 1
            logger.error("%s: %s; still serving generation %d", self.folder, self.last_error, self.generation)
            return False
        old = self.batcher.index
        self.batcher.swap(embedder, new)
        # a Milvus-backed index holds a client: closed once requests already running on it are done
        close = getattr(old, "close", None)
        if callable(close):
            loop.call_later(30.0, close)
        self.refused, self.last_error = None, None
        self.reloads += 1
        logger.info("%s: now serving generation %d (%d items, model %s)", self.folder, new.info.generation,
                    new.info.count, embedder.fingerprint)
        return True

    def _open_model_of(self, index: Any) -> Any:
        from ctxsim.deploy.embedder import open_index_model

        return open_index_model(index.info, opener=self._open_passed)

    def _open_passed(self, model: Any) -> Any:
        from ctxsim.export.parity import recorded_verdict

        passed, failures = recorded_verdict(model)
        if passed is False:  # an automatic swap must not bring in an artifact its own parity check failed
            raise ConfigError(f"{Path(model).name} failed its parity check ({'; '.join(failures[:2])})")
        return self.open_model(model)
