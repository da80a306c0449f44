"""Stage 3: embed, index, search and serve with an exported or trained model.

Public API: ``Embedder``, ``open_gallery``, ``build_index``, ``add_to_index``, ``load_index``, ``read_index_info``,
``Index``, ``IndexInfo``, ``search``, ``check_recall``, ``write_grid``, ``create_app``, ``serve``, ``bench``,
``BenchReport``, ``verify`` (a run, export or index folder's recorded hashes and verdicts), ``set_threads`` (the
thread policy of PyTorch, ONNX Runtime and FAISS: ``ctxsim.deploy.threads``). FAISS, FastAPI and uvicorn are
imported only when used.

Note: ``ctxsim.deploy.search``, ``.serve``, ``.bench`` and ``.verify`` are bound to the *functions* of the same name;
import the modules with ``import ctxsim.deploy.search as m`` / ``from ctxsim.deploy import search as ...`` accordingly.
"""
from __future__ import annotations

from ctxsim.deploy.bench import BenchReport, bench
from ctxsim.deploy.embedder import Embedder
from ctxsim.deploy.gallery import Gallery, GalleryItem, open_gallery
from ctxsim.deploy.index import (
    INDEX_TYPES,
    Index,
    IndexInfo,
    Item,
    add_to_index,
    build_index,
    load_index,
    read_index_info,
)
from ctxsim.deploy.search import Neighbor, QueryResult, check_recall, grid_size, search, write_grid
from ctxsim.deploy.serve import create_app, serve
from ctxsim.deploy.threads import set_threads
from ctxsim.deploy.verify import verify

__all__ = ["INDEX_TYPES", "BenchReport", "Embedder", "Gallery", "GalleryItem", "Index", "IndexInfo", "Item",
           "Neighbor", "QueryResult", "add_to_index", "bench", "build_index", "check_recall", "create_app",
           "grid_size", "load_index", "open_gallery", "read_index_info", "search", "serve", "set_threads", "verify",
           "write_grid"]
