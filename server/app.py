"""The FastAPI application: thin routes over the services, built by a factory.

    app = create_app(ServerSettings(models=[VariantSpec(path="./ckpt")]))
    uvicorn.run(app)

Nothing happens at import time; the lifespan loads the variants in the
background, so ``/health`` answers 503 until every model is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from steerserve.server.errors import APIError, install_error_handlers
from steerserve.server.generation import Generator
from steerserve.server.metrics import ServerMetrics
from steerserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    MCQRequest,
    ModelCard,
    ModelList,
    RenderRequest,
)
from steerserve.server.serving_chat import CompletionService, check_stream_options
from steerserve.server.serving_mcq import MCQService
from steerserve.server.settings import ServerSettings
from steerserve.server.variants import Variant, VariantRegistry, build_variant

logger = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def require_api_key(request: Request) -> None:
    """401 unless the bearer token matches (constant-time compare); open when no key is set."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")


def chat_service(request: Request) -> CompletionService:
    return request.app.state.completions


def mcq_service(request: Request) -> MCQService:
    return request.app.state.mcq


Chat = Annotated[CompletionService, Depends(chat_service)]
MCQ = Annotated[MCQService, Depends(mcq_service)]
api = APIRouter(dependencies=[Depends(require_api_key)])


def _started(request: Request, model: str) -> None:
    """Name the model for error metrics and count the accepted request."""
    request.state.model_name = model
    request.app.state.metrics.count_request(model, 200)


@api.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Chat) -> Response:
    request.state.model_name = body.model
    check_stream_options(body)
    prepared = service.prepare_chat(body)
    if body.stream:
        _started(request, prepared.variant.id)
        return StreamingResponse(
            service.chat_stream(body, prepared), media_type="text/event-stream", headers=SSE_HEADERS
        )
    response = await service.chat(body, prepared)
    _started(request, prepared.variant.id)
    return JSONResponse(response.model_dump(exclude_none=True))


@api.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, service: Chat) -> Response:
    request.state.model_name = body.model
    check_stream_options(body)
    batch = service.prepare_completions(body)
    if body.stream:
        _started(request, batch[0].variant.id)
        return StreamingResponse(
            service.completions_stream(body, batch), media_type="text/event-stream", headers=SSE_HEADERS
        )
    response = await service.completions(body, batch)
    _started(request, batch[0].variant.id)
    return JSONResponse(response.model_dump(exclude_none=True))


@api.post("/v1/mcq")
async def mcq(body: MCQRequest, request: Request, service: MCQ) -> Response:
    request.state.model_name = body.model
    response = await service.answer(body)
    _started(request, response.model)
    return JSONResponse(response.model_dump(exclude_none=True))


@api.post("/v1/render")
async def render(body: RenderRequest, request: Request, service: Chat) -> Response:
    request.state.model_name = body.model
    return JSONResponse(service.render(body).model_dump())


def model_card(variant: Variant) -> ModelCard:
    return ModelCard(
        id=variant.id,
        root=str(variant.path),
        precision=variant.precision.value,
        engine=variant.engine_name,
        steering=variant.steering.value if variant.steering else "pending",
        weight_bytes=variant.engine.weight_bytes() if variant.ready else None,
        disk_bytes=variant.manifest.get("bytes"),
        max_model_len=variant.max_model_len,
        ready=variant.ready,
        base=variant.base,
        adapter=variant.base is not None,
        served_as=variant.served_as,
        served_as_reason=variant.served_as_reason,
        reading_level_guidance=variant.reading_level_guidance,
        verbosity_guidance=variant.verbosity_guidance,
        loop_guard=variant.loop_guard,
    )


@api.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(v) for v in request.app.state.registry.variants.values()])


@api.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """OpenAI's ``models.retrieve``: one variant's card, or a 404 naming ``model``."""
    return model_card(request.app.state.registry.get(model_id))


@api.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def health(request: Request) -> JSONResponse:
    """200 once every variant is ready; 503 while loading (or if one failed), with per-model state."""
    registry: VariantRegistry = request.app.state.registry
    models = {v.id: "ready" if v.ready else ("failed" if v.error else "loading") for v in registry.variants.values()}
    ready = registry.ready
    status = "ok" if ready else ("failed" if "failed" in models.values() else "loading")
    return JSONResponse({"status": status, "models": models}, status_code=200 if ready else 503)


def build_registry(settings: ServerSettings) -> VariantRegistry:
    """Variants for every configured model; ``default`` resolves to the converted default checkpoint (and
    ``default:nf4`` to the default model quantized once by ``steerserve quantize``, see steerserve.default_model),
    ``steered:nf4`` to the shipped SteerLM adapter merged and quantized once (steerserve.steered_default).

    Checkpoints first, then LoRA adapters (``base=``) on them: an adapter served as LoRA must be
    registered with its base's engine before that engine starts.
    """
    from steerserve.default_model import DEFAULT_MODEL_NAME, resolve_default
    from steerserve.server.adapters import add_adapters
    from steerserve.steered_default import resolve_steered

    if (settings.tensor_parallel_size, settings.pipeline_parallel_size) != (1, 1):  # refuse before any work
        from steerserve.server.engines.vllm_args import check_parallel, detect_platform

        check_parallel(settings.tensor_parallel_size, settings.pipeline_parallel_size, detect_platform())
    variants = []
    for spec in settings.models:
        if spec.base is not None:
            continue
        if (path := resolve_default(spec.path, settings.cache_dir)) is not None:  # default, default:nf4
            spec = spec.model_copy(update={"name": spec.name or DEFAULT_MODEL_NAME})
        elif (path := resolve_steered(spec.path, settings.cache_dir)) is None:  # steered:nf4 keeps its manifest name
            path = Path(spec.path).expanduser().resolve()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"--model {spec.path}: no config.json there (not a checkpoint directory)")
        variants.append(build_variant(spec, settings, path))
    adapter_specs = [spec for spec in settings.models if spec.base is not None]
    variants += add_adapters(adapter_specs, settings, {v.id: v for v in variants})
    return VariantRegistry(settings, variants)


def create_app(settings: ServerSettings, registry: VariantRegistry | None = None) -> FastAPI:
    """The app for ``settings``; engines start in the lifespan, in the background."""
    registry = registry or build_registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(registry.load_all())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await registry.shutdown()

    app = FastAPI(title="steerserve", version="0.1.0", lifespan=lifespan)
    metrics = ServerMetrics(lambda: list(registry.variants.values()))
    for variant in registry.variants.values():
        variant.engine.on_step = metrics.step_observer(variant.id)
    generator = Generator(settings, metrics)
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    app.state.completions = CompletionService(registry, generator)
    app.state.mcq = MCQService(registry, generator)
    install_error_handlers(app)
    app.add_api_route("/health", health, methods=["GET"])
    app.include_router(api)
    return app
