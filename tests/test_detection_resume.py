"""``vitzoo finetune-det --resume`` after a run stopped in an evaluation or by a non-finite loss; what a resume
compares; epoch numbering; rank-0-only output (found by an audit)."""
import json

import pytest
import torch

from vitzoo.cli import main
from vitzoo.detection import finetune
from vitzoo.detection.checkpoint import load_checkpoint
from vitzoo.detection.distributed import DistContext
from vitzoo.detection.synthetic import make_shapes_dataset

COMMON = ['--backbone', 'shvit_s1', '--out-channels', '32', '--workers', '0', '--no-progress', '--batch-size', '2',
          '--seed', '3', '--detector', 'retinanet']
SIZED = ['--img-size', '96']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # 4 train images at batch 2: 2 iterations per epoch
    return make_shapes_dataset(tmp_path_factory.mktemp('det'), num_train=4, num_val=2, size=(72, 96))


def _log(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def _run(data, out, *extra, sized=True):
    return main(['finetune-det', '--data', str(data), '--out', str(out), *COMMON, *(SIZED if sized else ()), *extra])


def _interrupt(monkeypatch, calls):
    """Ctrl-C in the evaluations numbered ``calls`` (from 1); the others run."""
    real, seen = finetune.evaluate_coco, []

    def evaluate(*args, **kwargs):
        seen.append(1)
        if len(seen) in calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(finetune, 'evaluate_coco', evaluate)


def test_a_run_stopped_in_its_final_evaluation_finishes_on_resume(data, tmp_path, monkeypatch, capsys):
    args = ['--epochs', '1', '--hflip', '0']
    assert _run(data, tmp_path / 'full', *args) == 0
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        _interrupt(m, calls={1})
        assert _run(data, out, *args) == 130  # the CLI's exit code for Ctrl-C
    assert not (out / 'model_final.pth').exists()
    capsys.readouterr()
    # before: "nothing is left to train"; now the final evaluation runs and the weights are written, nothing trained
    assert _run(data, out, *args, '--resume') == 0
    captured = capsys.readouterr()
    assert 'training had ended: the evaluation and the final weights follow' in captured.out, captured
    assert 'done: 0 iterations;' in captured.out
    full, run = _log(tmp_path / 'full'), _log(out)
    assert run == full  # the same iterations and the same final evaluation as the run that was not stopped
    assert [r['iteration'] for r in run if 'eval' in r] == [2]
    weights = torch.load(out / 'model_final.pth')
    for k, v in load_checkpoint(out / 'checkpoint_last.pth')['model'].items():
        assert torch.equal(weights[k], v), k
    # now the run is complete: resuming it again has nothing to do
    assert _run(data, out, *args, '--resume') == 1
    assert 'nothing is left to train with --epochs 1' in capsys.readouterr().err


def test_a_run_stopped_before_its_final_weights_writes_them_on_resume(data, tmp_path, monkeypatch, capsys):
    """--no-eval: stopped while model_final.pth was written (after the last checkpoint)."""
    args = ['--epochs', '1', '--no-eval']
    out = tmp_path / 'run'
    real = finetune.atomic_save

    def stopped(obj, path):
        if path.name == 'model_final.pth':
            raise KeyboardInterrupt
        return real(obj, path)
    with monkeypatch.context() as m:
        m.setattr(finetune, 'atomic_save', stopped)
        assert _run(data, out, *args) == 130
    assert not (out / 'model_final.pth').exists()
    assert _run(data, out, *args, '--resume') == 0
    assert (out / 'model_final.pth').is_file() and [r['iteration'] for r in _log(out)] == [1, 2]
    captured = capsys.readouterr().out
    assert 'training had ended: the final weights follow' in captured and '[eval]' not in captured, captured


def test_an_interrupted_epoch_end_evaluation_runs_first_on_resume(data, tmp_path, monkeypatch, capsys):
    args = ['--epochs', '2']
    assert _run(data, tmp_path / 'full', *args) == 0
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        _interrupt(m, calls={1})  # the evaluation after epoch 1
        assert _run(data, out, *args) == 130
    assert load_checkpoint(out / 'checkpoint_last.pth')['iteration'] == 2
    capsys.readouterr()
    assert _run(data, out, *args, '--resume') == 0
    assert 'epoch 1 step 0 iteration 2 (the evaluation after epoch 1 was stopped: it runs first)' in \
        capsys.readouterr().out
    full, run = _log(tmp_path / 'full'), _log(out)
    # before: the evaluation after epoch 1 was never run; now it is, and the run goes on exactly as the full one
    assert [(r['epoch'], r['iteration']) for r in run if 'eval' in r] == [(1, 2), (2, 4)]
    assert run == full


def test_an_evaluation_logged_before_the_stop_is_logged_once(data, tmp_path, monkeypatch):
    """Stopped after the epoch-end evaluation was logged, before the checkpoint saying so was written."""
    args = ['--epochs', '2']
    out = tmp_path / 'run'
    real, saves = finetune._save, []

    def save(path, model, optimizer, scheduler, state, *rest):
        saves.append(state['pending'])
        if len(saves) == 2:  # the one after the evaluation
            raise KeyboardInterrupt
        return real(path, model, optimizer, scheduler, state, *rest)
    with monkeypatch.context() as m:
        m.setattr(finetune, '_save', save)
        assert _run(data, out, *args) == 130
    assert saves == [True, False] and load_checkpoint(out / 'checkpoint_last.pth')['pending']
    assert _run(data, out, *args, '--resume') == 0
    assert [r['iteration'] for r in _log(out) if 'eval' in r] == [2, 4]


def test_non_finite_loss_advice_can_be_followed(data, tmp_path, monkeypatch, capsys):
    """Before, the error said "lower --lr" next to the checkpoint to go on from, and a resume with another --lr is
    refused; now it offers what a resume allows (a larger --warmup-iters) and a new run for a lower --lr."""
    from torchvision.models.detection.retinanet import RetinaNet
    args = ['--epochs', '3', '--no-eval', '--checkpoint-every', '2', '--warmup-iters', '4']
    real, calls = RetinaNet.compute_loss, []

    def diverges_at_3(self, *a):
        calls.append(1)
        losses = real(self, *a)
        return {k: v * float('nan') for k, v in losses.items()} if len(calls) == 3 else losses
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        m.setattr(RetinaNet, 'compute_loss', diverges_at_3)
        assert _run(data, out, *args) == 1
    err = capsys.readouterr().err
    assert err == ('vitzoo finetune-det: error: non-finite loss at iteration 3 (classification nan, bbox_regression '
                   f'nan); resume from {out / "checkpoint_last.pth"} (iteration 2) with a larger --warmup-iters (now '
                   '4), or start a new run (--force, or another --out) with a lower --lr (now 0.0001), or check the '
                   'data.\n'), err
    # each way out the message offers works
    assert _run(data, out, *args[:-1], '8', '--resume') == 0
    assert [r['iteration'] for r in _log(out)] == [1, 2, 3, 4, 5, 6]
    assert _run(data, out, *args, '--lr', '5e-5', '--force') == 0
    assert _run(data, tmp_path / 'other', *args, '--lr', '5e-5') == 0


def test_non_finite_loss_without_a_checkpoint_says_to_start_again(data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert _run(data, out, '--lr', '1e30', '--warmup-iters', '0', '--epochs', '3', '--no-eval', '--hflip', '0') == 1
    err = capsys.readouterr().err
    assert err.endswith('); no checkpoint was written: start again (--force, or another --out) with a lower --lr '
                        '(now 1e+30) or a larger --warmup-iters (now 0), or check the data.\n'), err
    assert _run(data, out, '--epochs', '1', '--no-eval', '--force') == 0


def test_resume_with_other_image_sizes_or_flips_is_refused(data, tmp_path, monkeypatch, capsys):
    """Before, a resume without the run's --img-size / --hflip trained at 800 x 1333 with flips, without a word."""
    out = tmp_path / 'run'
    args = ['--epochs', '2', '--no-eval']
    assert _run(data, out, *args, '--hflip', '0', '--max-iters', '1') == 0
    capsys.readouterr()
    path = out / 'checkpoint_last.pth'
    for extra, differ in (
            (['--hflip', '0'], '--img-size 96 there, --min-size 800 --max-size 1333 here'),
            (['--img-size', '64', '--hflip', '0'], '--img-size 96 there, --img-size 64 here'),
            (['--img-size', '96'], '--hflip 0.0 there, 0.5 here'),
            ([], '--img-size 96 there, --min-size 800 --max-size 1333 here; --hflip 0.0 there, 0.5 here')):
        assert _run(data, out, *args, *extra, '--max-iters', '2', '--resume', sized=False) == 1
        assert capsys.readouterr().err == (
            f'vitzoo finetune-det: error: {path} is from another run: {differ}. Resume with the same arguments, or '
            'start a new run (--out elsewhere, or --force).\n'), extra
    # the same sizes given another way are the same run
    seen = []
    build = finetune.build_detector
    monkeypatch.setattr(finetune, 'build_detector', lambda *a, **kw: seen.append(kw) or build(*a, **kw))
    assert _run(data, out, *args, '--min-size', '96', '--max-size', '96', '--hflip', '0', '--max-iters', '2',
                '--resume', sized=False) == 0
    assert (seen[0]['min_size'], seen[0]['max_size']) == (96, 96)
    # a run with the default sizes resumes with the defaults given or left out
    default = tmp_path / 'default'
    assert _run(data, default, *args, '--max-iters', '1', sized=False) == 0
    assert _run(data, default, *args, '--min-size', '800', '--max-iters', '2', '--resume', sized=False) == 0


def test_a_checkpoint_without_rng_states_is_one_line(data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert _run(data, out, '--epochs', '2', '--no-eval', '--max-iters', '1') == 0
    ckpt = load_checkpoint(out / 'checkpoint_last.pth')
    del ckpt['rng']
    torch.save(ckpt, tmp_path / 'no-rng.pth')
    capsys.readouterr()
    assert _run(data, tmp_path / 'other', '--epochs', '2', '--no-eval', '--resume', str(tmp_path / 'no-rng.pth')) == 1
    assert capsys.readouterr().err == (f"vitzoo finetune-det: error: {tmp_path / 'no-rng.pth'} is not a finetune-det "
                                       "training checkpoint (missing ['rng']).\n")


def test_only_rank_0_warns_of_another_world_size(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    args = ['--epochs', '2', '--no-eval']
    assert _run(data, out, *args, '--max-iters', '1') == 0
    ckpt = load_checkpoint(out / 'checkpoint_last.pth')
    ckpt['rng'] = ckpt['rng'] * 2  # as written by 2 processes
    torch.save(ckpt, out / 'checkpoint_last.pth')
    capsys.readouterr()

    class NotMain(DistContext):  # a process that is not rank 0, without a process group
        is_main = False
    # it prints nothing (and writes nothing)
    monkeypatch.setattr(finetune, 'init_distributed', lambda device: NotMain(1, 0, 0, torch.device('cpu')))
    assert _run(data, out, *args, '--max-iters', '2', '--resume') == 0
    assert capsys.readouterr().out == ''
    monkeypatch.setattr(finetune, 'init_distributed', lambda device: DistContext(1, 0, 0, torch.device('cpu')))
    assert _run(data, out, *args, '--max-iters', '2', '--resume') == 0
    assert 'warning: checkpoint from 2 process(es), resuming with 1;' in capsys.readouterr().out


def test_epochs_are_counted_from_1_in_the_bar_and_the_log(data, tmp_path, monkeypatch):
    descs = []
    real = finetune.tqdm
    monkeypatch.setattr(finetune, 'tqdm', lambda *a, **kw: descs.append(kw['desc']) or real(*a, **kw))
    out = tmp_path / 'run'
    assert _run(data, out, '--epochs', '2', '--max-iters', '3') == 0
    assert descs == ['epoch 1/2', 'epoch 2/2']
    # an iteration names the epoch it belongs to; an evaluation after it names the same epoch
    assert [(r['epoch'], 'eval' in r) for r in _log(out)] == [(1, False), (1, False), (1, True), (2, False),
                                                              (2, True)]
    descs.clear()  # resumed in the middle of epoch 2: the bar goes on with it
    assert _run(data, out, '--epochs', '2', '--resume') == 0
    assert descs == ['epoch 2/2']
    assert [(r['epoch'], r['iteration']) for r in _log(out) if 'loss' in r] == [(1, 1), (1, 2), (2, 3), (2, 4)]


def test_a_training_checkpoint_as_backbone_weights_says_what_to_do(data, tmp_path, capsys):
    """Before, it was called a file pickling untrusted Python objects (numpy's RNG state in it)."""
    out = tmp_path / 'run'
    assert _run(data, out, '--epochs', '2', '--no-eval', '--max-iters', '1') == 0
    ckpt = out / 'checkpoint_last.pth'
    capsys.readouterr()
    assert _run(data, tmp_path / 'other', '--no-eval', '--backbone-weights', str(ckpt)) == 1
    assert capsys.readouterr().err == (
        f"vitzoo finetune-det: error: could not load {ckpt} into backbone 'shvit_s1': it is a finetune-det training "
        'checkpoint (a whole detector with its optimizer state), not classification weights; to continue its run '
        f'pass --resume {ckpt}, and for the trained detector use model_final.pth of that run.\n')
    assert not (tmp_path / 'other').exists()


def test_a_pending_checkpoint_past_this_runs_end_is_refused(data, tmp_path, monkeypatch, capsys):
    """Found by a review: a checkpoint stopped in the evaluation after epoch 2 (of 3), resumed with --epochs 1, was
    let through as "training had ended" and wrote its epoch-2 weights as this 1-epoch run's final weights."""
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        _interrupt(m, calls={2})  # the evaluation after epoch 2
        assert _run(data, out, '--epochs', '3') == 130
    assert load_checkpoint(out / 'checkpoint_last.pth')['epoch'] == 2
    capsys.readouterr()
    assert _run(data, out, '--epochs', '1', '--resume') == 1
    assert 'is at epoch 2, iteration 4: nothing is left to train with --epochs 1' in capsys.readouterr().err
    assert not (out / 'model_final.pth').exists()


def test_a_pending_evaluation_resumed_with_no_eval_is_neither_promised_nor_dropped(
        data, tmp_path, monkeypatch, capsys):
    """Found by a review: resumed with --no-eval, the resume line promised the stopped evaluation ("it runs first")
    and an evaluation already logged at that iteration was dropped from log.jsonl."""
    out = tmp_path / 'run'
    real_save = finetune._save

    def stop_after_the_logged_evaluation(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        if not args[3].get('pending', True) and args[3]['iteration'] == 2:  # the save after the evaluation
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(finetune, '_save', stop_after_the_logged_evaluation)
        assert _run(data, out, '--epochs', '2') == 130
    logged = _log(out)
    assert [r['iteration'] for r in logged if 'eval' in r] == [2]
    # a checkpoint still marked pending, as if stopped between the evaluation's log line and the save after it
    ckpt = torch.load(out / 'checkpoint_last.pth', weights_only=False)
    ckpt['pending'] = True
    torch.save(ckpt, out / 'checkpoint_last.pth')
    capsys.readouterr()
    assert _run(data, out, '--epochs', '2', '--no-eval', '--resume') == 0
    assert 'it runs first' not in capsys.readouterr().out
    assert [r['iteration'] for r in _log(out) if 'eval' in r] == [2]  # kept, not done again


def test_a_pending_checkpoint_past_a_smaller_max_iters_is_refused(data, tmp_path, monkeypatch, capsys):
    """Found by a second review: the same as for a smaller --epochs, but with --max-iters (the run ends at iteration
    1, the checkpoint reached 4): it was finished as this run's end."""
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        _interrupt(m, calls={2})  # the final evaluation, after epoch 2
        assert _run(data, out, '--epochs', '2') == 130
    capsys.readouterr()
    assert _run(data, out, '--epochs', '2', '--max-iters', '1', '--resume') == 1
    assert 'nothing is left to train with --epochs 2 / --max-iters 1' in capsys.readouterr().err
    assert not (out / 'model_final.pth').exists()


def test_resuming_a_runs_own_final_weights_in_its_folder_points_to_its_checkpoint(data, tmp_path, capsys):
    """Found by an audit: --resume OUT/model_final.pth with --out OUT said OUT "already holds another run" and to
    pass --force, which only led to the next refusal (weights only). Now the advice names the run's checkpoint,
    which resumes; nothing in OUT changes meanwhile."""
    out = tmp_path / 'run'
    assert _run(data, out, '--epochs', '2', '--max-iters', '1', '--no-eval') == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _run(data, out, '--epochs', '2', '--no-eval', '--resume', str(out / 'model_final.pth')) == 1
    err = capsys.readouterr().err
    assert err == (f'vitzoo finetune-det: error: {out / "model_final.pth"} is a file of the run in {out}, not its '
                   f'checkpoint_last.pth; resume from {out / "checkpoint_last.pth"}, which holds the run\'s latest '
                   'state.\n'), err  # no --force advice: it would only lead to the weights-only refusal
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a copy of the checkpoint under another name in the folder: --force resumes from it
    (out / 'copy.pth').write_bytes((out / 'checkpoint_last.pth').read_bytes())
    assert _run(data, out, '--epochs', '2', '--no-eval', '--resume', str(out / 'copy.pth')) == 1
    assert "(or pass --force to resume from copy.pth and replace the run's files)." in capsys.readouterr().err
    assert _run(data, out, '--epochs', '2', '--no-eval', '--resume', str(out / 'checkpoint_last.pth')) == 0
