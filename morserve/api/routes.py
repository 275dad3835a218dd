"""The small endpoints (/health, /version, /v1/models[/{id}], /tokenize, /detokenize, /tokenizer_info,
/metrics) and the router that gathers them with completions and chat."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import morserve
from morserve.api import chat, completions
from morserve.api.chat import chat_prompt_text
from morserve.api.errors import APIError, error_response, error_responses
from morserve.api.prompts import check_messages_length
from morserve.api.prompts import tokenize as tokenize_texts
from morserve.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeCompletionRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    VersionResponse,
)
from morserve.api.state import get_state
from morserve.engine import AsyncLLMEngine
from morserve.tokenizer import Tokenizer

router = APIRouter()


@router.get("/health", response_class=Response,
            responses={200: {"description": "Serving (empty body)", "content": None}, **error_responses(503)})
async def health(raw: Request) -> Response:
    """200 when serving; 503 while loading, draining or after an engine failure."""
    state = get_state(raw)
    if state.phase == "ready":
        return Response(status_code=200)
    return error_response(503, f"server is {state.phase}")


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=morserve.__version__)


def _model_cards(raw: Request) -> list[ModelCard]:
    state = get_state(raw)
    max_len = state.engine.max_model_len if state.engine is not None else None
    return [ModelCard(id=name, root=state.settings.model, max_model_len=max_len)
            for name in state.settings.served_model_names]


@router.get("/v1/models", response_model=ModelList)
async def list_models(raw: Request) -> ModelList:
    return ModelList(data=_model_cards(raw))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404))
async def retrieve_model(model_id: str, raw: Request) -> ModelCard:
    """One served model (OpenAI's retrieve-model); 404 for a name this server does not serve."""
    get_state(raw).check_model(model_id)
    return next(card for card in _model_cards(raw) if card.id == model_id)


def _tokenizer(engine: AsyncLLMEngine) -> Tokenizer:
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return engine.tokenizer


ENGINE_ERRORS = error_responses(400, 401, 404, 503)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ENGINE_ERRORS)
async def tokenize(body: TokenizeRequest, raw: Request) -> TokenizeResponse:
    state = get_state(raw)
    engine = state.ready_engine()
    model = state.check_model(body.model)
    tokenizer = _tokenizer(engine)
    if isinstance(body, TokenizeCompletionRequest):
        text = body.prompt
    else:
        check_messages_length(engine, body.messages)
        text = chat_prompt_text(engine, model, body.messages, body.add_generation_prompt)
    (ids,) = await tokenize_texts(engine, [text], body.add_special_tokens)
    strs = [tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ENGINE_ERRORS)
async def detokenize(body: DetokenizeRequest, raw: Request) -> DetokenizeResponse:
    state = get_state(raw)
    engine = state.ready_engine()
    state.check_model(body.model)
    tokenizer = _tokenizer(engine)
    vocab = engine.model_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=ENGINE_ERRORS)
async def tokenizer_info(raw: Request) -> TokenizerInfoResponse:
    engine = get_state(raw).ready_engine()
    tokenizer = _tokenizer(engine)
    return TokenizerInfoResponse(tokenizer_class=f"{type(tokenizer).__module__}.{type(tokenizer).__name__}",
                                 bos_token=tokenizer.bos_token, eos_token=(tokenizer.eos_tokens or [None])[0],
                                 pad_token=None, chat_template=tokenizer.chat_template,
                                 model_max_length=engine.max_model_len, vocab_size=tokenizer.vocab_size)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(raw: Request) -> Response:
    """Prometheus text format."""
    return Response(get_state(raw).metrics.render(), media_type=CONTENT_TYPE_LATEST)


router.include_router(completions.router)
router.include_router(chat.router)
