"""Does a tune sound as it was asked? Classifiers that read a tune's key, meter and style off its notes.

Each classifier is fitted on the labelled training tunes (labels.py reads the labels from the files); its
cross-validated accuracy on real tunes it was not fitted on is the ceiling: the rate at which a tune that truly
has the label is read as having it. A model asked for a label should be read as asked about as often.

Notes are [start_step, duration_steps, pitch] as tokens.tokens_to_notes gives them. The features read absolute
pitch and time (a key is an absolute pitch class; a meter's note values are absolute lengths at the corpus's
tempo), unlike the two-sample test's, which must not.
"""

from types import SimpleNamespace

import numpy as np

from labels import LABELS

MIN_CLASS_TUNES = 20        # a label fewer training tunes carry is left out of its classifier: too few to learn
MAX_TRAINING_TUNES = 10_000  # training tunes the classifiers read at the most (drawn at random): bounds the time
                             # a large corpus takes to read labels from and fit on
CEILING_FOLDS = 5           # stratified folds of the cross-validated accuracy (the ceiling)
GOAL_ADHERENCE_POINTS = 0.05  # generated tunes read as asked at most this far below the ceiling
MAX_TUNE_NOTES = 2000       # notes of a tune the features read: bounds the time of a runaway generated tune
# log2 of a time span over the tune's median inter-onset interval: 1/4 or less, ..., 8 or more
SPAN_EDGES = np.array([-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75])
# a meter shows in how onsets recur: lags, in median inter-onset intervals, the onset pattern is compared at
METER_LAGS = (1.5, 2, 3, 4, 6, 8, 9, 12, 16)
BAR_LENGTHS = (2, 3, 4, 6, 8, 12)  # candidate bars, in median inter-onset intervals
# Krumhansl and Kessler's probe-tone ratings of the 12 degrees in a major and in a minor key (1982)
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
KEY_PROFILES = np.array([np.roll(profile, tonic) for profile in (MAJOR_PROFILE, MINOR_PROFILE) for tonic in range(12)])


class MissingDependencyError(ImportError):
    """An evaluation-only package is not installed; the message says how to install it."""


def sklearn_parts():
    """scikit-learn's pieces, imported here only: it is an evaluation dependency, not a training one."""
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        raise MissingDependencyError('the classifiers of evaluate.py need scikit-learn: pip install -r '
                                     'requirements-eval.txt (or skip them with --no_c2st)') from None
    return SimpleNamespace(boosted=HistGradientBoostingClassifier, logistic=LogisticRegression,
                           folds=StratifiedKFold, pipeline=make_pipeline, scaler=StandardScaler,
                           threadpool_limits=threadpool_limits)


# -----------------------------------------------------------------------------
# features

def pitch_class_features(notes):
    """Key: the duration-weighted and the counted pitch-class shares, the correlation of the weighted shares with
    each of the 24 key profiles, and the first and the last note's pitch class (one-hot)."""
    pitch = np.array([n[2] for n in notes], dtype=np.int64) % 12
    duration = np.array([n[1] for n in notes], dtype=np.float64)
    weighted = np.bincount(pitch, weights=duration, minlength=12)
    weighted /= weighted.sum()
    counted = np.bincount(pitch, minlength=12) / len(pitch)
    spread = weighted.std()
    fits = (KEY_PROFILES - KEY_PROFILES.mean(1, keepdims=True)) @ (weighted - weighted.mean())
    fits = fits / (KEY_PROFILES.std(1) * 12 * spread) if spread > 0 else np.zeros(24)
    return np.concatenate([weighted, counted, fits, np.eye(12)[pitch[0]], np.eye(12)[pitch[-1]]])


def onset_features(notes):
    """Meter: the median inter-onset interval (IOI) and duration in steps (log2), the IOI and duration histograms
    relative to the median IOI, and how often an onset recurs METER_LAGS median IOIs later (weighted by duration,
    within a step either way), the same for the tune's longest notes."""
    start = np.array([n[0] for n in notes], dtype=np.float64)
    duration = np.array([n[1] for n in notes], dtype=np.float64)
    ioi = np.diff(start)
    ioi = ioi[ioi > 0]
    unit = float(np.median(ioi)) if len(ioi) else 1.0
    # onsets are floored to whole steps: the mean of the IOIs within a step of the median is a truer beat, and a
    # bar laid over a whole tune must not drift
    near = ioi[np.abs(ioi - unit) <= 1]
    unit = float(near.mean()) if len(near) else unit
    histogram = lambda spans: np.bincount(np.digitize(np.log2(spans / unit), SPAN_EDGES),
                                          minlength=len(SPAN_EDGES) + 1) / max(len(spans), 1)
    grid = np.zeros(int(start[-1] - start[0]) + 2)
    np.add.at(grid, (start - start[0]).astype(np.int64), duration)
    long_grid = np.zeros_like(grid)
    longest = duration >= np.quantile(duration, 0.8)
    np.add.at(long_grid, (start[longest] - start[0]).astype(np.int64), 1.0)
    recurrence = []
    for signal in (grid, long_grid):
        near = np.maximum(signal, np.maximum(np.roll(signal, 1), np.roll(signal, -1)))  # onsets floored to steps
        total = (signal * signal).sum()
        for lag in METER_LAGS:
            shift = int(round(lag * unit))
            same = (signal[:-shift] * near[shift:]).sum() if 0 < shift < len(signal) else 0.0
            recurrence.append(same / total if total else 0.0)
    # a bar's first beat draws long notes: for each candidate bar of k median IOIs, the largest duration-weighted
    # share of onsets at one phase of it (half-IOI bins), over the share an even spread would give
    salience = []
    for k in BAR_LENGTHS:
        phase = np.floor((start - start[0]) / (unit / 2)).astype(np.int64) % (2 * k)
        for weights in (duration, longest.astype(np.float64)):
            shares = np.bincount(phase, weights=weights, minlength=2 * k) / max(weights.sum(), 1e-9)
            salience.append(shares.max() * 2 * k)
    return np.concatenate([[np.log2(unit), np.log2(np.median(duration))], histogram(ioi), histogram(duration),
                           recurrence, salience])


def shape_features(notes):
    """Style: register (mean, lowest and highest pitch), range, number of notes (log2), the interval histogram, the
    share of steps and leaps, and the spread of durations."""
    pitch = np.array([n[2] for n in notes], dtype=np.float64)
    duration = np.array([n[1] for n in notes], dtype=np.float64)
    steps = np.diff(pitch)
    intervals = np.bincount(np.clip(steps, -12, 12).astype(np.int64) + 12, minlength=25) / max(len(steps), 1)
    moves = np.abs(steps)
    return np.concatenate([[pitch.mean(), pitch.min(), pitch.max(), np.ptp(pitch), np.log2(len(notes)),
                            (moves <= 2).mean() if len(moves) else 0.0, (moves >= 5).mean() if len(moves) else 0.0,
                            np.log2(duration).std()], intervals])


# which feature groups each label's classifier reads
LABEL_FEATURES = {'key': (pitch_class_features,),
                  'meter': (onset_features,),
                  'style': (pitch_class_features, onset_features, shape_features)}


def label_features(notes, label):
    """The feature vector label's classifier reads off one tune (at least two notes)."""
    notes = notes[:MAX_TUNE_NOTES]
    return np.concatenate([features(notes) for features in LABEL_FEATURES[label]]).astype(np.float64)


# -----------------------------------------------------------------------------
# classifiers and their ceilings

class LabelClassifier:
    """One label's classifier over the classes at least MIN_CLASS_TUNES training tunes carry: a multinomial logistic
    regression on standardised features (on the bundled Essen tunes it reads key, meter and style better than boosted
    trees, in a fraction of their time). .ceiling is its stratified CEILING_FOLDS-fold cross-validated accuracy over
    those tunes; .skipped says why there is no classifier (then .ceiling is None)."""

    def __init__(self, label, tunes, values, seed=0):
        self.label, self.seed, self.ceiling, self.skipped = label, seed, None, None
        counts = {}
        for value in values:
            counts[value] = counts.get(value, 0) + 1
        self.classes = sorted(v for v, c in counts.items() if v is not None and c >= MIN_CLASS_TUNES)
        known = set(self.classes)
        keep = [i for i, value in enumerate(values) if value in known and len(tunes[i]) >= 2]
        self.training_tunes, self.left_out = len(keep), len(values) - len(keep)
        if len(self.classes) < 2:
            self.skipped = (f'{len(self.classes)} {label} label{"s" if len(self.classes) != 1 else ""} carried by '
                            f'{MIN_CLASS_TUNES} or more training tunes; a classifier needs 2')
            return
        x = np.array([label_features(tunes[i], label) for i in keep])
        y = np.array([values[i] for i in keep])
        self.majority_share = max(counts[c] for c in self.classes) / len(keep)
        sk = sklearn_parts()
        predicted = np.empty(len(y), dtype=y.dtype)
        # one thread: see evaluate.c2st_accuracy (a few thousand rows; threads spin-waiting on a busy machine)
        with sk.threadpool_limits(1):
            for train, test in sk.folds(CEILING_FOLDS, shuffle=True, random_state=seed).split(x, y):
                predicted[test] = self._model(sk).fit(x[train], y[train]).predict(x[test])
            self.model = self._model(sk).fit(x, y)
        self.ceiling = float((predicted == y).mean())

    def _model(self, sk):
        return sk.pipeline(sk.scaler(), sk.logistic(max_iter=3000))

    def predict(self, tunes):
        """The label each tune is read as; None for a tune of fewer than two notes."""
        rows = [i for i, notes in enumerate(tunes) if len(notes) >= 2]
        read = [None] * len(tunes)
        if rows:
            with sklearn_parts().threadpool_limits(1):
                for i, value in zip(rows, self.model.predict(np.array([label_features(tunes[i], self.label)
                                                                      for i in rows]))):
                    read[i] = str(value)
        return read

    def accuracy(self, tunes, values):
        """(share of the tunes whose known label is read right, how many tunes carry a known label)."""
        pairs = [(notes, value) for notes, value in zip(tunes, values) if value in self.classes]
        if not pairs:
            return float('nan'), 0
        read = self.predict([notes for notes, _ in pairs])
        return float(np.mean([r == value for r, (_, value) in zip(read, pairs)])), len(pairs)

    def report(self):
        if self.skipped:
            return {'skipped': self.skipped}
        return {'classes': self.classes, 'training_tunes': self.training_tunes, 'left_out': self.left_out,
                'ceiling': self.ceiling, 'majority_share': self.majority_share}


def training_sample(count, seed=0):
    """Indices of the training tunes the classifiers read: all of them, or MAX_TRAINING_TUNES drawn at random."""
    if count <= MAX_TRAINING_TUNES:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, MAX_TRAINING_TUNES, replace=False).tolist())


def fit_label_classifiers(tunes, labels, seed=0):
    """{label: LabelClassifier} for 'key', 'meter' and 'style', fitted on note lists and their label dicts."""
    return {label: LabelClassifier(label, tunes, [tune_labels.get(label) for tune_labels in labels], seed)
            for label in LABELS}


# -----------------------------------------------------------------------------
# adherence: generated tunes asked for labels, read back

def asked_labels(held_out_labels, count, seed=0, can_ask=lambda label, value: True):
    """count label dicts to ask for, each the labels of a held-out tune drawn at random (so labels come as often
    as in real tunes, the ceilings' mix), a label kept where can_ask(label, value) (the model can be asked it)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(held_out_labels), count) if held_out_labels else []
    asked = [{label: value for label, value in held_out_labels[i].items() if can_ask(label, value)} for i in picks]
    return asked


def adherence_rates(classifiers, asked, tunes):
    """Per label: how many tunes were asked for one the classifier knows, the share of them read as asked (a tune
    of fewer than two notes is not), the ceiling, the gap in points (ceiling - rate) and whether it is within
    GOAL_ADHERENCE_POINTS. A label without a classifier, or with no tune asked for it, is left out."""
    rates = {}
    for label, classifier in classifiers.items():
        rows = [i for i, labels in enumerate(asked) if labels.get(label) in classifier.classes]
        if classifier.skipped or not rows:
            continue
        read = classifier.predict([tunes[i] for i in rows])
        rate = float(np.mean([value == asked[i][label] for i, value in zip(rows, read)]))
        gap = classifier.ceiling - rate
        rates[label] = {'asked': len(rows), 'read_as_asked': rate, 'ceiling': classifier.ceiling,
                        'gap_points': 100 * gap, 'within_goal': bool(gap <= GOAL_ADHERENCE_POINTS)}
    return rates
