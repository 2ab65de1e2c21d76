"""The LitAPI: what LitServe runs in each inference worker, a thin adapter to `service.worker`.

LitServe's async streaming loop calls `predict` once per request, as an asyncio task; the request
arrives already validated and tokenized by an HTTP process, and `predict` streams the worker's
answers back (an acceptance or a refusal first, then the generated chunks).
"""

from __future__ import annotations

import litserve as ls

from service.bridge import RouteSpec
from service.messages import GenerationRequest, ServerGone
from service.settings import ServiceSettings
from service.status import StatusBoard
from service.worker import start_worker


class GenerationAPI(ls.LitAPI):
    def __init__(self, settings: ServiceSettings, board: StatusBoard, controls: list, spec: RouteSpec):
        super().__init__(stream=True, enable_async=True, spec=spec)
        self.settings = settings
        self.board = board
        self.controls = controls

    def setup(self, device: str) -> None:
        self.worker = start_worker(self.settings, self.board, self.controls, self.spec.request_queue, device)

    async def decode_request(self, request: GenerationRequest) -> GenerationRequest:
        return request

    async def predict(self, request: GenerationRequest):
        async for message in self.worker.generate(request):
            yield message

    async def encode_response(self, output):
        async for message in output:
            yield message

    def http_server_died(self, index: int) -> None:
        """Cancel every generation whose client was on HTTP server `index`: its answers have no reader."""
        for control in self.controls:
            control.put(ServerGone(index))
