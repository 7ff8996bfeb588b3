"""A smart-home intent dataset written by the project: 14 intents, templates x slot values.

Deterministic for a seed. The test split holds out whole phrasings (one template per intent)
plus a random share of the rest, so test accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "hallway", "garage", "office", "dining room",
         "basement", "attic", "porch", "nursery"]
LIGHTS = ["light", "lights", "lamp", "ceiling light", "lamps"]
NUMBERS = ["10", "20", "25", "30", "40", "50", "60", "70", "75", "80", "90", "100"]
TEMPS = ["18", "19", "20", "21", "22", "23", "24", "68", "70", "72"]
DOORS = ["front door", "back door", "garage door", "side door", "patio door"]
SONGS = ["some jazz", "rock music", "my playlist", "the radio", "classical music", "something relaxing",
         "the news podcast", "some pop"]
MINUTES = ["5 minutes", "10 minutes", "15 minutes", "half an hour", "an hour", "20 minutes", "3 minutes"]
CITIES = ["today", "tomorrow", "this weekend", "tonight", "in london", "in paris", "this afternoon"]
PREFIXES = ["", "", "", "please ", "hey home ", "could you ", "can you ", "i want to ", "would you "]
SUFFIXES = ["", "", "", " please", " now", " thanks", " right now"]

# intent -> templates; {room} {light} {n} {t} {door} {song} {min} {when} are slots.
INTENTS: dict[str, list[str]] = {
    "lights_on": ["turn on the {room} {light}", "switch on the {light} in the {room}", "{light} on in the {room}",
                  "it is too dark in the {room}", "light up the {room}", "put the {room} {light} on"],
    "lights_off": ["turn off the {room} {light}", "switch off the {light} in the {room}", "{light} off in the {room}",
                   "kill the {light} in the {room}", "no more light in the {room}", "shut the {room} {light} off"],
    "set_brightness": ["dim the {room} {light} to {n} percent", "set the {light} in the {room} to {n}",
                       "brightness {n} in the {room}", "make the {room} {light} {n} percent bright",
                       "change {room} brightness to {n}"],
    "set_temperature": ["set the temperature to {t} degrees", "make it {t} degrees in the {room}",
                        "heat the {room} to {t}", "thermostat to {t}", "i want {t} degrees in here"],
    "get_temperature": ["what is the temperature in the {room}", "how warm is the {room}", "is it cold in the {room}",
                        "how hot is it in the {room}", "tell me the {room} temperature"],
    "lock_door": ["lock the {door}", "secure the {door}", "make sure the {door} is locked", "bolt the {door}",
                  "lock up the {door} for the night"],
    "unlock_door": ["unlock the {door}", "open the lock on the {door}", "let me in through the {door}",
                    "unbolt the {door}", "release the {door} lock", "get the {door} unlocked"],
    "play_music": ["play {song}", "put on {song} in the {room}", "start playing {song}", "i want to hear {song}",
                   "music in the {room}: {song}"],
    "stop_music": ["stop the music", "pause the music in the {room}", "silence in the {room}", "stop playing",
                   "enough music", "turn the music off"],
    "set_volume": ["volume to {n}", "set the volume to {n} percent", "turn the volume up to {n}",
                   "make it louder, {n} percent", "change the {room} speaker volume to {n}"],
    "open_blinds": ["open the blinds in the {room}", "raise the {room} shades", "let some sun into the {room}",
                    "open the curtains in the {room}", "pull up the {room} blinds"],
    "close_blinds": ["close the blinds in the {room}", "lower the {room} shades", "block the sun in the {room}",
                     "draw the curtains in the {room}", "close the curtains in the {room}", "pull down the {room} blinds"],
    "set_timer": ["set a timer for {min}", "timer {min}", "remind me in {min}", "start a {min} countdown",
                  "wake me up in {min}", "start a {min} timer"],
    "get_weather": ["what is the weather {when}", "will it rain {when}", "do i need an umbrella {when}",
                    "weather forecast {when}", "is it going to be sunny {when}"],
}
# Requests, not questions or statements, take a politeness prefix ("could you ...").
_NO_PREFIX = ("what", "how", "is ", "will", "do ", "it ", "i ", "no ", "enough", "tell", "music in", "timer ",
              "volume ", "brightness ", "thermostat", "weather", "silence", "{light}")
SLOTS = {"room": ROOMS, "light": LIGHTS, "n": NUMBERS, "t": TEMPS, "door": DOORS, "song": SONGS,
         "min": MINUTES, "when": CITIES}
LABELS = sorted(INTENTS)


@dataclass(frozen=True)
class IntentSplit:
    texts: list[str]
    labels: list[int]


def _fill(template: str, rng: random.Random, n: int) -> list[str]:
    """Up to n distinct utterances: slot values x politeness prefixes and suffixes."""
    names = [s for s in SLOTS if "{" + s + "}" in template]
    prefixes = [""] if template.startswith(_NO_PREFIX) else PREFIXES
    combos = list(itertools.product(*(SLOTS[s] for s in names), prefixes, SUFFIXES))
    rng.shuffle(combos)
    out: list[str] = []
    seen: set[str] = set()
    for combo in combos:
        *values, prefix, suffix = combo
        text = prefix + template.format(**dict(zip(names, values))) + suffix
        if text not in seen:
            seen.add(text)
            out.append(text)
        if len(out) >= n:
            break
    return out


def generate(per_intent: int = 400, seed: int = 0, test_share: float = 0.15) -> tuple[IntentSplit, IntentSplit]:
    """(train, test): about per_intent utterances per intent; the last template of each intent is test-only."""
    rng = random.Random(seed)
    train_t: list[str] = []
    train_y: list[int] = []
    test_t: list[str] = []
    test_y: list[int] = []
    for label, intent in enumerate(LABELS):
        templates = INTENTS[intent]
        per_template = max(1, per_intent // len(templates))
        held_out = templates[-1]
        for tpl in templates:
            utterances = sorted(set(_fill(tpl, rng, per_template)))
            rng.shuffle(utterances)
            if tpl == held_out:
                test_t += utterances
                test_y += [label] * len(utterances)
                continue
            k = int(len(utterances) * test_share)
            test_t += utterances[:k]
            test_y += [label] * k
            train_t += utterances[k:]
            train_y += [label] * (len(utterances) - k)
    order = list(range(len(train_t)))
    rng.shuffle(order)
    train = IntentSplit([train_t[i] for i in order], [train_y[i] for i in order])
    return train, IntentSplit(test_t, test_y)
