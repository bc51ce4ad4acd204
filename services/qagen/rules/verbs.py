"""Enough verb morphology to turn "X installed Y" into "When did X install Y?"."""

from __future__ import annotations

import re

AUXILIARIES = frozenset("is are was were has have had".split())
_IRREGULAR_PAST = dict(
    pair.split(":")
    for pair in """arose:arise ate:eat became:become began:begin bent:bend bit:bite blew:blow
    broke:break brought:bring built:build burnt:burn bought:buy caught:catch chose:choose came:come
    dealt:deal drew:draw drank:drink drove:drive dug:dig fell:fall fed:feed felt:feel fought:fight
    found:find fled:flee flew:fly forgot:forget froze:freeze gave:give got:get went:go grew:grow
    hung:hang heard:hear held:hold hid:hide kept:keep knew:know laid:lay led:lead left:leave lent:lend
    lost:lose made:make meant:mean met:meet paid:pay ran:run rang:ring rose:rise said:say saw:see
    sold:sell sent:send shot:shoot sang:sing sank:sink sat:sit slept:sleep spoke:speak spent:spend
    stood:stand stole:steal struck:strike swam:swim took:take taught:teach tore:tear told:tell
    thought:think threw:throw understood:understand woke:wake wore:wear won:win wrote:write lit:light
    sought:seek withdrew:withdraw overcame:overcome undertook:undertake shone:shine spun:spin
    swore:swear wove:weave rode:ride shook:shake sprang:spring stuck:stick swept:sweep wept:weep
    bore:bear forgave:forgive foresaw:foresee oversaw:oversee rebuilt:rebuild""".split()
)
PARTICIPLES = frozenset(
    """built bought brought caught chosen done drawn driven eaten fallen found given gone grown held
    hidden kept known laid led left lent lit lost made meant met paid run said seen sold sent set shown
    shut spoken spent stood taken taught told thought thrown understood won worn written born borne
    begun broken frozen forgotten stolen struck sung sunk hung rebuilt put cut""".split()
)
_LEMMA_EXCEPTIONS = dict(
    pair.split(":")
    for pair in """created:create treated:treat added:add used:use guided:guide opened:open
    happened:happen listened:listen offered:offer covered:cover entered:enter ordered:order
    answered:answer visited:visit edited:edit limited:limit benefited:benefit developed:develop
    equipped:equip preferred:prefer referred:refer occurred:occur transferred:transfer
    controlled:control travelled:travel cancelled:cancel labelled:label modelled:model
    united:unite fuelled:fuel considered:consider delivered:deliver discovered:discover
    gathered:gather governed:govern numbered:number remembered:remember suffered:suffer
    wondered:wonder""".split()
)
_NOT_VERBS_ED = frozenset(
    "bed red shed fed wed need seed speed breed bred hundred sacred naked wicked kindred rugged".split()
)


def past_verb(word: str) -> bool:
    """Whether a word looks like a past-tense verb ("installed", "built")."""
    w = word.lower()
    if w in _IRREGULAR_PAST:
        return True
    return len(w) > 4 and w.endswith("ed") and w not in _NOT_VERBS_ED and w.isalpha()


def lemma(past: str) -> str:
    """The base form of a past-tense verb ("installed" -> "install", "lit" -> "light")."""
    w = past.lower()
    if w in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[w]
    if w in _LEMMA_EXCEPTIONS:
        return _LEMMA_EXCEPTIONS[w]
    if not w.endswith("ed"):
        return w
    if w.endswith("ied") and len(w) > 4:
        return w[:-3] + "y"
    stem = w[:-2]
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiouylsz":
        return stem[:-1]  # stopped -> stop
    if stem.endswith(
        ("at", "bl", "iz", "yz", "dl", "tl", "gl", "pl", "cl", "kl", "fl", "rg", "dg", "lg", "ang")
    ):
        return stem + "e"  # located, enabled, organized, charged, changed
    if stem.endswith(("c", "v", "u", "ib")) or re.search(r"[^aeiou][iu]d$", stem):
        return stem + "e"  # produced, moved, continued, described, decided, included
    if re.search(r"(?:[^aeiou]ur|[^aeo]ir|[^aeiou]ar|(?:st|pl|gn|sc|d)or)$", stem):
        return stem + "e"  # measured, required, compared, restored (not poured, chaired, cleared)
    if re.search(r"[aeiou]s$", stem) and not re.search(r"[^aeiou]us$", stem):
        return stem + "e"  # caused, used, closed (not focused)
    if len(stem) <= 4 and re.fullmatch(r"[^aeiou]*[aeiou][^aeiouwxy]", stem):
        return stem + "e"  # named, voted, stated
    return stem


def present_base(verb: str) -> str | None:
    """ "costs" -> "cost", "carries" -> "carry"; None when the word is no third-person verb."""
    if len(verb) < 4 or not verb.endswith("s") or verb.endswith(("ss", "us", "is", "ous")):
        return None
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return verb[:-2]
    return verb[:-1]
