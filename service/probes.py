"""Routes for load balancers and scrapers: readiness and metrics, never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service import metrics
from service.board import Board, Status
from service.settings import ServiceSettings


def probes(settings: ServiceSettings, board: Board) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    def health() -> Response:
        """200 when every inference worker serves a model, 503 with the reason otherwise."""
        workers = board.workers()
        body = {
            "status": "ready",
            "workers": [
                {"worker": w.worker_id, "status": w.status.name.lower(), "step": w.step, "val_loss": w.val_loss}
                for w in workers
            ],
        }
        starting = [w.worker_id for w in workers if w.status is Status.STARTING]
        if starting:
            body.update(status="starting", message=f"inference workers {starting} are starting")
        elif any(w.status is Status.WAITING for w in workers):
            body.update(status="waiting", message=settings.waiting_message)
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @router.get("/metrics")
    def scrape() -> Response:
        data, content_type = metrics.render(board.main_pid, board.roles())
        return Response(data, media_type=content_type)

    return router
