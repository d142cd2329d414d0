"""What a request's output must match: a JSON schema, any JSON object, a regex, one of fixed strings
or a Lark grammar, as canonical text (so equal guides share one compiled grammar)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from jaxserve.errors import UserError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# Compact separators with single spaces and no free whitespace: a model cannot stall in an endless
# run of blanks, and the text still reads like json.dumps output.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Guide:
    kind: str  # one of KINDS
    spec: str  # canonical JSON of the schema or choices; the regex or grammar (Lark or GBNF) text; "" for json_object

    @classmethod
    def json_schema(cls, schema: Any) -> Guide:
        """From a schema object or its JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise UserError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise UserError("the JSON schema must be an object")
        return cls("json_schema", json.dumps(schema))  # key order kept: properties are generated in it

    @classmethod
    def choice(cls, choices: Any) -> Guide:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise UserError("the choices must be a non-empty array of non-empty strings")
        return cls("choice", json.dumps(choices))

    def grammar(self) -> str:
        """The llguidance grammar text."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, overrides=_JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=_JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", self.spec)
        return llguidance.grammar_from("grammar", self.spec)  # Lark, or GBNF as llama.cpp and vLLM take it

    @property
    def description(self) -> str:
        return {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice", "grammar": "grammar"}[self.kind]
