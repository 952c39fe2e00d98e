"""options.py: --field value and config files filled from an Args-like class, and the up-front check of settings."""

import argparse
import os

import pytest

from custom_training import Args
from options import (
    RULES,
    ArgumentParser,
    OptionError,
    add_switch,
    apply_config,
    check_args,
    exit_on_bad_args,
    optional,
    parse_args,
    parse_args_and_given,
)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default ./content/... folders are checked against a writable folder
    return tmp_path


def refusal(argv):
    with pytest.raises(OptionError) as e:
        check_args(parse_args(Args(), argv))
    return str(e.value)


# -----------------------------------------------------------------------------
# check_args

def test_defaults_pass_every_rule():
    check_args(Args())


def test_every_field_of_training_args_has_a_rule():
    assert set(vars(Args())) <= set(RULES)


def test_zero_seq_len_is_refused_naming_the_field_and_what_is_allowed():
    assert refusal(['--seq_len', '0']) == '--seq_len 0: must be an integer >= 1'


@pytest.mark.parametrize('argv', [
    ['--seq_len', '0'], ['--batch_size', '0'], ['--batch_size', '2.5'], ['--grad_accum', '0'], ['--lr', '-1'],
    ['--lr', '0'], ['--timing', 'foo'], ['--dtype', 'float8'], ['--heads', '0'], ['--dropout', '1.5'],
    ['--dropout', '1'], ['--val_fraction', '2'], ['--generate_length', '-5'], ['--lr_schedule', 'linear'],
    ['--top_p', '0'], ['--top_p', '1.5'], ['--temperature', '-1'], ['--save_every', '0'], ['--validate_every', '0'],
    ['--print_stats_every', '0'], ['--generate_every', '0'], ['--aug_range', '-3'], ['--aug_range', '25'],
    ['--max_steps', '0'], ['--dim_head', '63'], ['--beat_division', '0'], ['--top_k', '0'], ['--output_tempo', '0'],
    ['--device', 'gpu'], ['--device', 'cuda:x'], ['--seed', '-1'], ['--lr', 'nan'], ['--max_bad_steps', '0'],
    ['--num_workers', '-1'], ['--data_path', 'none'],
])
def test_bad_value_is_refused_naming_the_field(argv):
    message = refusal(argv)
    assert message.startswith(f'{argv[0]} ') and ': must be ' in message
    assert '\n' not in message


@pytest.mark.parametrize('value', ['melody=73,melody=74', 'melody=128', 'melody=-1', 'melody=', 'melody=0x10',
                                   'melody=\u00b9', 'lead=73', '=5', 'Melody=73'])
def test_bad_programs_are_refused_in_one_line_saying_what_is_allowed(value):
    assert refusal(['--programs', value]) == (
        f"--programs {value!r}: must be None (the training set's most common) or role=program pairs, each role "
        f"once, e.g. 'melody=73,bass=33' (roles melody, bass, harmony, drums; programs 0-127)")


def test_fractional_batch_size_is_refused_not_rounded():
    args = parse_args(Args(), ['--batch_size', '2.5'])
    assert args.batch_size == 2.5
    assert refusal(['--batch_size', '2.5']) == '--batch_size 2.5: must be an integer >= 1'


def test_true_does_not_pass_as_an_integer_but_an_int_passes_as_a_float():
    args = Args()
    args.depth = True
    with pytest.raises(OptionError, match='--depth True'):
        check_args(args)
    args = Args()
    args.lr, args.grad_clip = 1, 0
    check_args(args)


def test_string_value_is_quoted_and_the_choices_listed():
    assert refusal(['--timing', 'foo']) == "--timing 'foo': must be one of 'ms', 'beats'"


def test_top_p_zero_message_says_none_turns_it_off():
    assert refusal(['--top_p', '0']) == '--top_p 0: must be None (off) or a number in (0, 1]'
    check_args(parse_args(Args(), ['--top_p', 'none']))


def test_open_and_closed_ends_of_a_range_are_told_apart():
    assert refusal(['--dropout', '1']) == '--dropout 1.0: must be a number in [0, 1)'
    check_args(parse_args(Args(), ['--dropout', '0', '--val_fraction', '0', '--top_p', '1']))


def test_good_values_at_the_edges_pass():
    check_args(parse_args(Args(), ['--prompt_length', '0', '--temperature', '0', '--grad_clip', '0', '--aug_range',
                                   '24', '--beat_division', '96', '--device', 'cuda:1', '--top_k', '1',
                                   '--max_steps', '1', '--checkpoint', 'latest', '--output_tempo', '90.5']))


def test_save_dir_under_a_read_only_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip('root writes anywhere; the existing-file case is tested below')
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        message = refusal(['--save_dir', str(locked / 'ckpt')])
    finally:
        locked.chmod(0o700)
    assert message.startswith(f"--save_dir '{locked / 'ckpt'}': must be a folder we can write to")


def test_save_dir_that_is_an_existing_file_is_refused(tmp_path):
    (tmp_path / 'taken').write_text('not a folder')
    assert refusal(['--save_dir', str(tmp_path / 'taken')]).startswith("--save_dir '")
    assert 'file' in refusal(['--samples_dir', str(tmp_path / 'taken' / 'below')])


def test_checking_a_folder_creates_nothing(tmp_path):
    check_args(parse_args(Args(), ['--save_dir', str(tmp_path / 'a' / 'b'), '--samples_dir', str(tmp_path / 's')]))
    assert list(tmp_path.iterdir()) == []


def test_min_lr_above_lr_is_refused_only_with_the_cosine_schedule():
    check_args(parse_args(Args(), ['--lr', '1e-5']))  # constant: min_lr is never used
    with pytest.raises(OptionError, match='--min_lr 3e-05: must be <= --lr'):
        check_args(parse_args(Args(), ['--lr', '1e-5', '--lr_schedule', 'cosine']))


def test_voice_leading_of_training_samples_is_refused_without_parts_tracks():
    check_args(parse_args(Args(), ['--voice_leading', 'true', '--tracks', 'parts']))
    with pytest.raises(OptionError, match="^--voice_leading true: needs --tracks parts \\(got 'melody'"):
        check_args(parse_args(Args(), ['--voice_leading', 'true', '--tracks', 'melody']))
    args = parse_args(Args(), [])
    args.voice_leading = 2  # a config file's value, not a command line's
    with pytest.raises(OptionError, match='^--voice_leading 2: must be true or false$'):
        check_args(args)


def test_the_voice_leading_loss_is_refused_without_parts_tracks_and_bounded():
    check_args(parse_args(Args(), ['--voice_leading_loss', '3', '--tracks', 'parts']))
    check_args(parse_args(Args(), ['--voice_leading_loss', '0', '--tracks', 'melody']))  # off: fine for any run
    with pytest.raises(OptionError, match="^--voice_leading_loss 3.0: needs --tracks parts \\(got 'all'"):
        check_args(parse_args(Args(), ['--voice_leading_loss', '3']))
    for bad in ('-1', '101', 'nan'):
        with pytest.raises(OptionError, match=f'^--voice_leading_loss {bad}'):
            check_args(parse_args(Args(), ['--voice_leading_loss', bad, '--tracks', 'parts']))
    check_args(parse_args(Args(), ['--voice_leading_floor', '1e-3', '--voice_leading_loss', '1', '--tracks', 'parts']))
    for bad in ('0', '1.5', 'nan'):
        with pytest.raises(OptionError, match=f'^--voice_leading_floor {bad}'):
            check_args(parse_args(Args(), ['--voice_leading_floor', bad, '--voice_leading_loss', '1']))
    with pytest.raises(OptionError, match='^--voice_leading_floor 0.001: needs --voice_leading_loss above 0'):
        check_args(parse_args(Args(), ['--voice_leading_floor', '1e-3', '--tracks', 'parts']))


def test_guidance_of_training_samples_is_refused_without_conditioning_and_bounded():
    check_args(parse_args(Args(), ['--guidance', '2', '--condition', 'true']))
    check_args(parse_args(Args(), ['--guidance', '1']))  # off: fine for any model
    with pytest.raises(OptionError, match=r'^--guidance 2.0: needs --condition true'):
        check_args(parse_args(Args(), ['--guidance', '2']))
    with pytest.raises(OptionError, match='^--guidance 15.0: must be'):
        check_args(parse_args(Args(), ['--guidance', '15', '--condition', 'true']))
    check_args(parse_args(Args(), ['--end_guidance', '4', '--condition', 'true']))
    check_args(parse_args(Args(), ['--end_guidance', 'none']))  # as guidance: fine for any model
    with pytest.raises(OptionError, match=r'^--end_guidance 4: needs --condition true'):
        check_args(parse_args(Args(), ['--end_guidance', '4']))
    with pytest.raises(OptionError, match='^--end_guidance -1: must be'):
        check_args(parse_args(Args(), ['--end_guidance', '-1', '--condition', 'true']))


def test_aligned_windows_are_refused_without_packing_which_would_ignore_them():
    check_args(parse_args(Args(), ['--align_windows', 'true']))
    check_args(parse_args(Args(), ['--pack', 'false']))
    assert refusal(['--align_windows', 'true', '--pack', 'false']) == (
        '--align_windows true: needs --pack true (windows are aligned to tune starts in the packed stream; --pack '
        'false crops each tune from a random start)')


def test_rules_are_by_name_so_another_scripts_namespace_gets_the_same_checks():
    ns = argparse.Namespace(num_samples=4, length=0, temperature=1.0, top_p=0.95, tempo=None, no_audio=False)
    with pytest.raises(OptionError, match='^--length 0: must be an integer in 1..100000$'):
        check_args(ns)
    ns.length = 512
    check_args(ns)  # no_audio has no rule and is left alone
    for name, bad in [('ngram', 7), ('prompt_notes', 0), ('sample_length', 0), ('tempo', -1), ('prompt', 3)]:
        with pytest.raises(OptionError, match=f'^--{name} '):
            check_args(argparse.Namespace(**{name: bad}))


@pytest.mark.parametrize('value', ['inf', '-inf', 'nan'])
def test_an_infinite_or_nan_number_is_refused_as_not_finite(value):
    with pytest.raises(OptionError, match=f'^--temperature {value}: must be a finite number >= 0$'):
        check_args(argparse.Namespace(temperature=float(value)))


@pytest.mark.parametrize('name', ['length', 'sample_length', 'generate_length'])
def test_a_generation_length_beyond_the_stated_bound_is_refused(name):
    check_args(argparse.Namespace(**{name: 100_000}))
    with pytest.raises(OptionError, match=f'^--{name} 1000000000: must be .*an integer in 1..100000$'):
        check_args(argparse.Namespace(**{name: 1_000_000_000}))


def test_names_limits_the_check_and_rules_can_be_widened_per_script():
    args = Args()
    args.dim, args.dtype = 0, None
    check_args(args, names=['seq_len', 'dtype_typo_is_ignored'])
    with pytest.raises(OptionError, match='--dtype None'):
        check_args(args, names=['dtype'])
    check_args(args, names=['dtype'], rules={**RULES, 'dtype': optional(RULES['dtype'])})


def test_exit_on_bad_args_prints_one_line_and_exits_2(capsys):
    args = Args()
    args.seq_len = 0
    with pytest.raises(SystemExit) as e:
        exit_on_bad_args(args)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == '' and err == 'error: --seq_len 0: must be an integer >= 1\n'
    exit_on_bad_args(Args())  # good settings: returns quietly


# -----------------------------------------------------------------------------
# parse_args and config files

def test_command_line_values_are_read_like_their_defaults():
    args = parse_args(Args(), ['--dim', '1e3', '--lr', '1', '--aug', 'off', '--compile', 'YES', '--top_p', 'null',
                               '--top_k', '5', '--output_tempo', '96.5', '--checkpoint', 'latest',
                               '--seed', '4294967295', '--timing', 'beats'])
    assert (args.dim, args.lr, args.aug, args.compile, args.top_p) == (1000, 1.0, False, True, None)
    assert type(args.dim) is int and type(args.lr) is float
    assert (args.top_k, args.output_tempo, args.checkpoint, args.seed) == (5, 96.5, 'latest', 4294967295)
    assert args.timing == 'beats' and args.seq_len == 100


def test_text_that_is_not_a_value_of_the_fields_type_exits_2_with_one_line(capsys):
    for argv, says in ((['--aug', 'maybe'], "--aug: expected true or false, got 'maybe'"),
                       (['--dim', 'big'], "--dim: expected a number, got 'big'"),
                       (['--no_such_option', '1'], 'unrecognized arguments: --no_such_option')):
        with pytest.raises(SystemExit) as e:
            parse_args(Args(), argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1 and says in err, err


def test_help_lists_each_field_with_its_comment_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args(), ['--help'], description='Train it.')
    assert e.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines
    assert 'Train it.' in text
    assert '--seq_len V sequence length for training (tokens per window) (default: 100)' in text
    assert all(f'--{name} V ' in text for name in vars(Args()))
    assert '(default: None)' in text and 'config.py' in text


class Percent:
    def __init__(self):
        self.val_fraction = 0.05                # share of files held out (5% by default)


def test_a_percent_sign_in_a_comment_shows_in_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(Percent(), ['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'share of files held out (5% by default) (default: 0.05)' in text


def test_config_file_is_applied_before_command_line_overrides(tmp_path):
    config = tmp_path / 'quick.py'
    config.write_text('dim = 256\nmax_steps = 50\nlr = 1e-3\n')
    args = parse_args(Args(), ['--max_steps', '100', str(config)])
    assert (args.dim, args.max_steps, args.lr) == (256, 100, 1e-3)


def test_the_fields_set_by_a_config_file_or_the_command_line_are_named_even_when_equal_to_the_default(tmp_path):
    config = tmp_path / 'quick.py'
    config.write_text('_base = 64\ndim = _base * 4\nlr = 1e-3\n')
    args, given = parse_args_and_given(Args(), ['--lr', '2e-3', str(config), '--seq_len', '100'])
    assert given == ['dim', 'lr', 'seq_len'] and (args.dim, args.lr, args.seq_len) == (256, 2e-3, 100)
    assert parse_args_and_given(Args(), [])[1] == []


def test_config_files_apply_in_order_and_their_helpers_are_not_settings(tmp_path):
    (tmp_path / 'a.py').write_text('import math\n_base = 64\ndim = _base * 4\nheads = 4\n')
    (tmp_path / 'b.py').write_text('def double(x):\n    return 2 * x\n\nheads = double(8)\n')
    args = parse_args(Args(), ['a.py', 'b.py'])
    assert (args.dim, args.heads) == (256, 16)


def test_wrong_type_in_a_config_file_is_caught_by_check_args(tmp_path):
    (tmp_path / 'c.py').write_text("seq_len = '128'\n")
    assert refusal(['c.py']) == "--seq_len '128': must be an integer >= 1"


def test_unknown_name_in_a_config_file_is_refused_naming_file_and_name(tmp_path):
    (tmp_path / 'typo.py').write_text('dimm = 256\n')
    with pytest.raises(OptionError, match=r"typo\.py: 'dimm' is not a setting \(did you mean 'dim'"):
        apply_config(Args(), 'typo.py')


@pytest.mark.parametrize('text, reason', [
    (None, 'cannot read it'),
    ('dim = \n', 'SyntaxError'),
    ('dim = 1 / 0\n', 'ZeroDivisionError'),
    ('dim_hed = 32\n', "'dim_hed' is not a setting (did you mean 'dim_head'"),
    (b'dim = 256  # caf\xe9 in Latin-1\n', "not UTF-8 text (byte 16 is b'\\xe9'); save it as UTF-8"),
    ('fifo', 'not a regular file'),
])
def test_bad_config_file_exits_2_with_one_line_naming_it(tmp_path, capsys, text, reason):
    if text == 'fifo':
        os.mkfifo(tmp_path / 'bad.py')  # opening it would wait for a writer for ever
    elif isinstance(text, bytes):
        (tmp_path / 'bad.py').write_bytes(text)
    elif text is not None:
        (tmp_path / 'bad.py').write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(Args(), ['bad.py'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: config file bad.py: ') and reason in err and err.count('\n') == 1


def test_positional_argument_that_is_not_a_py_file_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args(), ['256'])
    assert e.value.code == 2
    assert 'end' in capsys.readouterr().err


def test_threads_is_a_count_of_cpu_threads_with_0_for_one_a_core():
    check_args(argparse.Namespace(threads=0))
    with pytest.raises(OptionError, match='^--threads -1: must be an integer >= 0$'):
        check_args(argparse.Namespace(threads=-1))


# -----------------------------------------------------------------------------
# on/off options of generate.py and evaluate.py

@pytest.mark.parametrize('argv, value', [
    ([], None), (['--int8'], True), (['--int8', 'true'], True), (['--int8', 'False'], False), (['--int8', 'no'], False),
    (['--no-int8'], False), (['--no_int8'], False), (['--no_int8', 'false'], True), (['--no-int8', 'yes'], False)])
def test_an_on_off_option_takes_the_training_scripts_true_or_false_alone_or_a_no_form(argv, value):
    parser = ArgumentParser()
    add_switch(parser, 'int8', default=None)
    assert parser.parse_args(argv).int8 is value


def test_an_on_off_option_named_no_something_has_no_double_negative_but_takes_false():
    parser = ArgumentParser()
    add_switch(parser, 'no_audio')
    assert [parser.parse_args(argv).no_audio for argv in ([], ['--no_audio'], ['--no_audio', 'false'])] == [
        False, True, False]
    with pytest.raises(SystemExit):
        parser.parse_args(['--no-no_audio'])


def test_an_on_off_option_given_a_word_other_than_true_or_false_exits_2_with_one_line(capsys):
    parser = ArgumentParser()
    add_switch(parser, 'voice_leading')
    with pytest.raises(SystemExit) as e:
        parser.parse_args(['--voice_leading', 'maybe'])
    assert (e.value.code, capsys.readouterr().err) == (
        2, "error: argument --voice_leading: expected true or false, got 'maybe'\n")
