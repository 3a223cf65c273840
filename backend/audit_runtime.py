"""signer_ctx: the signing key, read once at startup when configured (before the database is touched, so
that a refused key changes nothing); audit_ctx: the Merkle tree folder."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from backend.appkeys import AUDIT_FOLDER, AUDIT_SIGNER, DATABASE_DSN, LISTENER, METRICS, SETTINGS, SUPERVISOR
from backend.audit.folder import TASK, Folder
from backend.audit.signing import Signer
from projections.service import connector


async def signer_ctx(app: web.Application) -> AsyncIterator[None]:
    path = app[SETTINGS].audit_signing_key_file
    if path is not None:
        app[AUDIT_SIGNER] = await asyncio.to_thread(Signer.configured, path)
    yield


async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    signer = app.get(AUDIT_SIGNER)
    folder = Folder(connector(app[DATABASE_DSN], settings, durable_commits=False), app[LISTENER], signer=signer,
                    checkpoint_s=settings.audit_checkpoint_s, batch_size=settings.audit_fold_batch)
    app[AUDIT_FOLDER] = folder
    metrics = app[METRICS]
    metrics.gauge("tally_audit_folder_leading", "1 while this process folds the Merkle tree",
                  lambda: int(folder.leading))
    metrics.gauge("tally_audit_tree_size", "Leaves this process has folded into the Merkle tree (0 unless leading)",
                  lambda: folder.size if folder.leading else 0)
    metrics.counter("tally_audit_checkpoints_signed_total", "Checkpoints this process's folder has signed",
                    lambda: folder.signed)
    job = app[SUPERVISOR].spawn(TASK, folder.run, serves=False) if settings.run_audit_folder else None
    try:
        yield
    finally:
        await app[SUPERVISOR].stop(job)
