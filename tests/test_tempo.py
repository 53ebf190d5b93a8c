"""Time-stretching (csm_gguf.tempo): lengths, pitch, timing, and streaming equal to whole signals."""

import numpy as np
import pytest

from csm_gguf.tempo import WINDOW, TimeStretch, change_speed

RATE = 24_000
SPEEDS = [0.25, 0.5, 0.8, 1.25, 2.0, 4.0]


def voiced(seconds: float, f0: float = 173.3) -> np.ndarray:
    """A vowel-like tone: five harmonics of f0, whose period (138.5 samples) is no whole number."""
    t = np.arange(round(seconds * RATE)) / RATE
    return sum(0.3 / k * np.sin(2 * np.pi * f0 * k * t + k) for k in range(1, 6)).astype(np.float32)


def harmonic_residual(audio: np.ndarray, f0: float, block: int = 960) -> float:
    """The worst, over 40 ms blocks, of how much of a block five harmonics of f0 (any amplitudes and
    phases) leave unexplained: near 0 only if the pitch is f0 and the waveform runs on without breaks."""
    t = np.arange(block) / RATE
    basis = np.stack([f(2 * np.pi * f0 * k * t) for k in range(1, 6) for f in (np.sin, np.cos)], axis=1)
    worst = 0.0
    for start in range(block, len(audio) - 2 * block, block):
        x = audio[start : start + block]
        fit, *_ = np.linalg.lstsq(basis, x, rcond=None)
        worst = max(worst, np.linalg.norm(x - basis @ fit) / np.linalg.norm(x))
    return worst


@pytest.mark.parametrize("speed", SPEEDS)
def test_stretched_voice_keeps_its_pitch_without_breaks(speed):
    out = change_speed(voiced(2.0), speed)
    # Up to where the last windows reach past the input's end, into silence. Windows laid down where
    # they happen to fall (no search for the best match) leave 20-90% here.
    assert harmonic_residual(out[: len(out) - round(WINDOW / speed)], 173.3) < 0.01


@pytest.mark.parametrize("speed", SPEEDS)
@pytest.mark.parametrize("n", [0, 1, 359, 720, 1920, 7777, 48_000])
def test_length_is_the_input_length_over_speed(speed, n):
    audio = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert len(change_speed(audio, speed)) == round(n / speed)


@pytest.mark.parametrize("speed", SPEEDS)
def test_sounds_come_at_their_time_over_speed(speed):
    """Beeps at 0.5 s and 1.5 s of silence come out at 0.5 / speed and 1.5 / speed."""
    audio = np.zeros(2 * RATE, np.float32)
    beep = voiced(0.1)
    for at in (0.5, 1.5):
        audio[round(at * RATE) : round(at * RATE) + len(beep)] = beep
    energy = change_speed(audio, speed).astype(np.float64) ** 2
    half = round(RATE / speed)  # 1 s of input: between the beeps
    for part, start, at in ((energy[:half], 0, 0.5), (energy[half:], half, 1.5)):
        centre = start + (np.arange(len(part)) * part).sum() / part.sum()
        # In the input's time: windows move by up to 10 ms to match, and at speed 4 they are 60 ms apart.
        assert abs(centre / RATE * speed - (at + 0.05)) < 0.025


@pytest.mark.parametrize("speed", [0.3, 0.9, 1.7, 4.0])
def test_streaming_in_any_chunks_equals_the_whole_signal(speed):
    rng = np.random.default_rng(1)
    audio = np.concatenate([voiced(0.5), rng.standard_normal(9000).astype(np.float32) * 0.1, voiced(0.4, 120.0)])
    stretch, out, i = TimeStretch(speed), [], 0
    while i < len(audio):
        n = int(rng.integers(1, 4000))
        out.append(stretch.feed(audio[i : i + n]))
        i += n
    out.append(stretch.finish())
    np.testing.assert_array_equal(np.concatenate(out), change_speed(audio, speed))


@pytest.mark.parametrize("n, speed", [(15, 1.2), (25, 2.0), (1001, 0.4)])
def test_one_sample_at_a_time_equals_the_whole_signal(n, speed):
    """n / speed ending in .5: lengths summed chunk by chunk in floats rounded the other way."""
    audio = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    stretch = TimeStretch(speed)
    out = np.concatenate([*(stretch.feed(audio[i : i + 1]) for i in range(n)), stretch.finish()])
    np.testing.assert_array_equal(out, change_speed(audio, speed))


def test_a_change_of_speed_takes_the_stream_on_without_a_gap():
    stretch = TimeStretch(0.25)
    slow = stretch.feed(voiced(1.0))
    stretch.speed = 4.0  # the windows from here on: they still hold about 40 ms of what was fed
    out = np.concatenate([slow, stretch.finish()])
    assert len(out) > 3.9 * RATE
    assert harmonic_residual(out[: len(out) - WINDOW // 4], 173.3) < 0.01  # no silence at the end


def test_speed_one_gives_the_input_back():
    audio = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    assert change_speed(audio, 1.0) is not None and np.array_equal(change_speed(audio, 1.0), audio)
    stretch = TimeStretch(1.0)  # the stretcher itself, as a websocket file uses it after a change of speed
    out = np.concatenate([stretch.feed(audio[:3000]), stretch.feed(audio[3000:]), stretch.finish()])
    np.testing.assert_allclose(out, audio, atol=1e-6)


@pytest.mark.parametrize("speed", [0.2, 4.5, float("nan"), "2", True, None, 0])
def test_bad_speeds_are_refused(speed):
    with pytest.raises(ValueError, match="speed must be a number from 0.25 to 4.0"):
        TimeStretch(speed)
    stretch = TimeStretch(1.5)
    with pytest.raises(ValueError, match="speed must be a number from 0.25 to 4.0"):
        stretch.speed = speed
    assert stretch.speed == 1.5


def test_any_real_number_is_a_speed():
    assert TimeStretch(np.float32(1.5)).speed == 1.5 and TimeStretch(np.int64(2)).speed == 2.0


def test_only_mono_audio_is_stretched():
    with pytest.raises(ValueError, match="1-D array; got shape"):
        change_speed(np.zeros((100, 2), np.float32), 1.0)


def test_a_finished_stretch_takes_no_more_audio():
    stretch = TimeStretch(2.0)
    stretch.feed(np.zeros(100, np.float32))
    assert len(stretch.finish()) == 50 and len(stretch.finish()) == 0
    with pytest.raises(RuntimeError, match="finished"):
        stretch.feed(np.zeros(10, np.float32))
