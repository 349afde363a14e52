"""FastAPI dependencies: the shared service and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from producer.api.auth import Caller
from producer.api.service import ChatService


def get_service(request: Request) -> ChatService:
    return request.app.state.svc  # type: ignore[no-any-return]


async def get_caller(request: Request) -> Caller:
    return await request.app.state.auth(request)  # type: ignore[no-any-return]


Service = Annotated[ChatService, Depends(get_service)]
Authed = Annotated[Caller, Depends(get_caller)]
