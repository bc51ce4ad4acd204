"""The `local` backend: pairs from a transformers instruct model held in this process.

One generation at a time (the model is not shared between threads). By default guided: the JSON is
written here and the model fills in only each question and answer text, so a small model that cannot
keep a JSON format still gives parsable output. torch and transformers are imported when a reply is
made, so this module loads without them. Prompts and strict parsing are `prompting.ModelGenerator`'s.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from services.qagen.backends.prompting import ModelGenerator

# guided local generation starts the i-th question of a reply with these words, in turn
QUESTION_STARTS = ("What", "Who", "When", "How", "Where", "Which")


class LocalGenerator(ModelGenerator):
    """Pairs from a transformers instruct model held in this process (the base model or another).

    The prompt goes through the tokenizer's chat template. The first try decodes greedily; a retry
    after malformed output samples (`temperature`), since greedy decoding would repeat the same
    reply. One generation at a time: the model is not shared between threads.

    `guided=True` (the default) writes the JSON itself and lets the model fill in only the text of
    each question and answer, each ended by the model's closing quote: small models that cannot
    keep a JSON format (the 135M default breaks it on nearly every reply) still give parsable
    output, and what they write is judged by the same quality gate. Up to `pairs_per_prompt`
    pairs per prompt; a repeated or empty question ends the list. `guided=False` asks for the
    whole reply and parses it strictly.
    """

    concurrency = 1

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 512,
        format_retries: int = 2,
        temperature: float = 0.7,
        guided: bool = True,
        pairs_per_prompt: int = 3,
        max_field_tokens: int = 80,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the local QA model's tokenizer has no chat template; use an instruct model")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.format_retries, self.temperature = (
            max_new_tokens,
            format_retries,
            temperature,
        )
        self.guided, self.pairs_per_prompt, self.max_field_tokens = guided, pairs_per_prompt, max_field_tokens
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, messages: list[dict[str, str]], attempt: int = 0) -> str:
        if self.guided:
            return self._filled(messages, attempt)
        return self._free(messages, attempt)

    def _filled(self, messages: list[dict[str, str]], attempt: int) -> str:
        """A JSON array written here, with the model writing each question and answer text."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with self._lock:
            self.calls += 1
            reply, seen = "[", set()
            for i in range(self.pairs_per_prompt):
                # a question word to start with: small models otherwise copy a sentence of the text
                start = QUESTION_STARTS[(i + attempt) % len(QUESTION_STARTS)]
                pair_head = reply + (", " if i else "") + '{"question": '
                question = (
                    start + self._field(prompt + pair_head + '"' + start, sample=bool(attempt or i))
                ).strip()
                if question == start or question.casefold() in seen:
                    break
                head = pair_head + json.dumps(question) + ', "answer": "'
                answer = self._field(prompt + head, sample=bool(attempt)).strip()
                if not answer:
                    break
                seen.add(question.casefold())
                reply += (", " if i else "") + json.dumps({"question": question, "answer": answer})
            return reply + "]"

    def _field(self, text: str, *, sample: bool) -> str:
        """The model's continuation of `text` up to its first double quote (a JSON string's end)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        start = inputs["input_ids"].shape[1]
        tokenizer = self.tokenizer

        class QuoteWritten(StoppingCriteria):  # decoding what is new is cheap at these lengths
            def __call__(self, input_ids, scores, **kwargs):
                done = '"' in tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        sampling = {"do_sample": True, "temperature": self.temperature} if sample else {"do_sample": False}
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_field_tokens,
                stopping_criteria=StoppingCriteriaList([QuoteWritten()]),
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
                **sampling,
            )
        new = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        text = new.split('"', 1)[0]
        return (" " if text[:1].isspace() else "") + " ".join(text.split())

    def _free(self, messages: list[dict[str, str]], attempt: int) -> str:
        import torch

        with self._lock, torch.inference_mode():
            self.calls += 1
            inputs = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(self.model.device)
            sampling = (
                {"do_sample": True, "temperature": self.temperature} if attempt else {"do_sample": False}
            )
            pad = self.tokenizer.pad_token_id
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
                **sampling,
            )
            new = out[0, inputs["input_ids"].shape[1] :]
            return self.tokenizer.decode(new, skip_special_tokens=True)
