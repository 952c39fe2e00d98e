"""adherence.py: label classifiers on made-up tunes whose labels are known and separable, and the read-as-asked
rates of generators that do or do not listen."""

import numpy as np
import pytest

import adherence

C_MAJOR = [0, 2, 4, 5, 7, 9, 11]
F_SHARP_MINOR = [6, 8, 9, 11, 1, 2, 4]  # F# G# A B C# D E: the tonic first


def scale_tune(rng, scale, octave=60, notes=24, step=8):
    """A walk over a scale's degrees (pitch classes, the tonic first) that starts and ends on its tonic, a note
    every `step` steps; octave: the C the pitch classes are counted from."""
    degrees = np.clip(np.cumsum(rng.integers(-2, 3, notes)), -5, 9)
    degrees[0] = degrees[-1] = 0
    pitches = [octave + scale[d % 7] + 12 * (d // 7) for d in degrees]
    return [[i * step, step, int(p)] for i, p in enumerate(pitches)]


def metered_tune(rng, meter, bars=12, beat=8):
    """Bars of a meter's rhythm: '3/4' a half then a quarter note, or three quarters; '2/4' a dotted quarter and
    an eighth, or two quarters; pitches random over an octave."""
    patterns = {'3/4': ([2, 1], [1, 1, 1]), '2/4': ([1.5, 0.5], [1, 1])}[meter]
    notes, start = [], 0
    for _ in range(bars):
        for length in patterns[int(rng.integers(0, 2))]:
            notes.append([start, int(length * beat), int(rng.integers(60, 72))])
            start += int(length * beat)
    return notes


def key_set(rng, count):
    tunes = [scale_tune(rng, C_MAJOR) for _ in range(count)] + [scale_tune(rng, F_SHARP_MINOR, 48)
                                                               for _ in range(count)]
    return tunes, ['C major'] * count + ['F# minor'] * count


def test_key_classifier_tells_c_major_from_f_sharp_minor():
    rng = np.random.default_rng(0)
    tunes, keys = key_set(rng, 30)
    classifier = adherence.LabelClassifier('key', tunes, keys)
    assert classifier.classes == ['C major', 'F# minor'] and classifier.ceiling >= 0.95
    fresh, fresh_keys = key_set(rng, 10)
    accuracy, counted = classifier.accuracy(fresh, fresh_keys)
    assert accuracy >= 0.95 and counted == 20
    assert classifier.predict([scale_tune(rng, F_SHARP_MINOR, 72), [[0, 4, 60]]]) == ['F# minor', None]


def test_meter_classifier_tells_triple_from_duple_bars():
    rng = np.random.default_rng(1)
    tunes = [metered_tune(rng, '3/4') for _ in range(30)] + [metered_tune(rng, '2/4') for _ in range(30)]
    classifier = adherence.LabelClassifier('meter', tunes, ['3/4'] * 30 + ['2/4'] * 30)
    assert classifier.ceiling >= 0.9
    assert classifier.predict([metered_tune(rng, '3/4'), metered_tune(rng, '2/4')]) == ['3/4', '2/4']


def test_rare_and_missing_labels_are_left_out_and_one_label_alone_gives_no_classifier():
    rng = np.random.default_rng(2)
    tunes, keys = key_set(rng, 25)
    keys = keys[:-1] + [None]  # F# minor: 24 tunes, still enough
    tunes.append(scale_tune(rng, C_MAJOR))
    keys.append('G major')  # one tune only
    classifier = adherence.LabelClassifier('key', tunes, keys)
    assert classifier.classes == ['C major', 'F# minor'] and classifier.left_out == 2
    alone = adherence.LabelClassifier('key', tunes[:25], keys[:25])
    assert alone.ceiling is None and 'a classifier needs 2' in alone.skipped and alone.report() == {
        'skipped': alone.skipped}


def test_a_generator_that_plays_the_key_asked_is_read_as_asked_and_one_that_ignores_it_is_not():
    rng = np.random.default_rng(3)
    tunes, keys = key_set(rng, 30)
    classifiers = {'key': adherence.LabelClassifier('key', tunes, keys)}
    held_out = [{'key': 'C major', 'meter': '2/4'}, {'key': 'F# minor'}, {'key': 'G major'}, {'style': 'x'}]
    asked = adherence.asked_labels(held_out, 60, seed=0)
    assert len(asked) == 60 and all(labels in held_out for labels in asked)  # held-out tunes' labels, as they are
    scales = {'C major': C_MAJOR, 'F# minor': F_SHARP_MINOR}
    listening = [scale_tune(rng, scales.get(labels.get('key'), C_MAJOR)) for labels in asked]
    rates = adherence.adherence_rates(classifiers, asked, listening)['key']
    # only tunes asked for a key the classifier knows count: not G major, not the tunes asked for no key
    counted = [labels['key'] for labels in asked if labels.get('key') in scales]
    assert rates['asked'] == len(counted) and rates['read_as_asked'] >= 0.95 and rates['within_goal']
    assert rates['gap_points'] == pytest.approx(100 * (classifiers['key'].ceiling - rates['read_as_asked']))
    deaf = [scale_tune(rng, C_MAJOR) for _ in asked]
    rates = adherence.adherence_rates(classifiers, asked, deaf)['key']
    assert rates['read_as_asked'] == pytest.approx(counted.count('C major') / len(counted))
    assert not rates['within_goal']
    # what the model cannot be asked is left out of the ask
    only_minor = adherence.asked_labels(held_out, 20, can_ask=lambda label, value: value == 'F# minor')
    assert {tuple(labels.items()) for labels in only_minor} <= {(), (('key', 'F# minor'),)}
    assert adherence.adherence_rates(classifiers, [{'meter': '2/4'}], [deaf[0]]) == {}


def test_features_have_one_length_whatever_the_tune():
    rng = np.random.default_rng(4)
    for label in adherence.LABEL_FEATURES:
        sizes = {len(adherence.label_features(tune, label)) for tune in
                 ([[0, 4, 60], [4, 4, 62]], scale_tune(rng, C_MAJOR, notes=300), metered_tune(rng, '3/4'),
                  [[0, 4, 60], [0, 4, 64], [0, 8, 67]])}  # a chord: no inter-onset interval at all
        assert len(sizes) == 1, label
        assert all(np.isfinite(adherence.label_features(metered_tune(rng, '2/4'), label)))


def test_a_large_corpus_gives_the_classifiers_a_random_sample_of_its_training_tunes(monkeypatch):
    assert adherence.training_sample(5) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(adherence, 'MAX_TRAINING_TUNES', 4)
    picked = adherence.training_sample(10, seed=1)
    assert len(picked) == 4 and picked == sorted(set(picked)) and picked == adherence.training_sample(10, seed=1)
