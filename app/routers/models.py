"""/api/models: the models a run can use without downloading anything."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from app.security import TokenDep
from trainer.catalog import BUILTIN_MODELS

router = APIRouter(prefix="/api/models", tags=["models"], dependencies=[TokenDep])


class ModelPublic(BaseModel):
    name: str
    description: str


@router.get("", response_model=list[ModelPublic])
def list_models() -> list[ModelPublic]:
    """The built-in models. A run may also name a local Hugging Face model folder, or a hub id that is
    already in the local Hugging Face cache."""
    return [ModelPublic(name=name, description=text) for name, text in BUILTIN_MODELS.items()]
