"""Structured outputs in the API: the one constraint a request asks for, from OpenAI's
`response_format` (json_object, json_schema) or vLLM's `structured_outputs` and older `guided_json` /
`guided_regex` / `guided_choice` / `guided_grammar` fields. It is compiled off the event loop before
the request starts, so an invalid schema, regex or grammar is a 400 naming the field it came from."""

from __future__ import annotations

from dataclasses import dataclass

from morserve.api.errors import APIError
from morserve.api.protocol import SamplingRequest
from morserve.engine import AsyncLLMEngine
from morserve.engine.structured import StructuredOutputsParams

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


@dataclass
class Constraint:
    params: StructuredOutputsParams
    param: str                     # the request field it came from


def _constraint(param: str, **fields) -> Constraint:
    try:
        return Constraint(StructuredOutputsParams(**fields), param)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def request_constraints(body: SamplingRequest) -> list[Constraint]:
    """Every constraint the request's own fields ask for (none, or one unless it is contradictory)."""
    found = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(_constraint("response_format", json_object=True))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", param="response_format")
        found.append(_constraint("response_format", json=fmt.json_schema.json_schema))
    so = body.structured_outputs
    if so is not None:
        found.append(_constraint("structured_outputs", json=so.json_, regex=so.regex, choice=so.choice,
                                 grammar=so.grammar, json_object=bool(so.json_object),
                                 disable_any_whitespace=so.disable_any_whitespace))
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(body, name)
        if value is not None:
            found.append(_constraint(name, **{kind: value}))
    return found


def one_constraint(found: list[Constraint]) -> Constraint | None:
    """The request's constraint; a 400 when several fields ask for one."""
    if len(found) > 1:
        raise APIError(400, f"only one structured-output constraint per request; got "
                            f"{', '.join(c.param for c in found)}", param=found[1].param)
    return found[0] if found else None


async def check_constraint(engine: AsyncLLMEngine, constraint: Constraint | None) -> StructuredOutputsParams | None:
    """Compile the constraint (in a worker thread; the engine then finds it cached): 400 if invalid."""
    if constraint is None:
        return None
    try:
        await engine.check_structured(constraint.params)
    except ValueError as exc:
        raise APIError(400, f"{constraint.param}: {exc}", param=constraint.param) from None
    return constraint.params
