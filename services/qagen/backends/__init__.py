"""QA generation backends behind one interface (`base.Generator`): each turns one chunk into pairs.

`extractive` the rules of `strategies.py` (no model), `openai_api` any OpenAI-compatible
`/v1/chat/completions` endpoint, `local` a transformers instruct model in this process; the two
model backends share the prompts, the strict reply parsing and the format retries of `prompting`.
A generator either returns pairs or raises `base.ChunkFailed`; it never fills a gap with pairs it
made up. `services.qagen.pipeline.generate_document` drives a generator over a whole document;
`factory.make_generator` builds the backend a session asks for.
"""
