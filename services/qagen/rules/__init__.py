"""The extractive rule sets, one per module; `services.qagen.strategies` is their interface.

- `quiz`: dates, numbers, people and a fallback (`generate_pairs`, with `definition`);
- `definition`: "X is a Y." -> "What is X?";
- `wh`: who/what/when/where/why/how, with the fact questions of `facts`;
- `document`: summaries, section summaries and vague questions; `metadata`: title, authors, date;
- `paraphrase`: rewordings of the other rules' questions.

`base` holds the candidate and pair every rule set makes, `clause` and `verbs` the sentence parsing
the question rules share; the text helpers are in `services.qagen.text`.
"""
