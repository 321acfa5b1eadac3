"""``ov run --agent``: the requested secrets, sealed to the request that asked for
them (ovagent/core/seal.py); the client execs the command in its own world, and the
agent touches nothing of that world."""

import binascii

from ..core import protocol, seal
from ..core.protocol import ProtocolError


def release(state, peer, req, subkey, request_id):
    """The requested secrets sealed to this request, as an encoded 'released'
    frame, recorded before it is returned: the client execs the command in its
    own world."""
    app, env, revealed, decision = state.reveal(req, peer)
    plaintext = seal.encode_secrets({name: value for name, (_, value)
                                     in revealed.items()})
    sealed = seal.seal(subkey, req, plaintext)
    try:
        frame = protocol.encode_frame({
            "type": "released", "request_id": request_id,
            "sealed": binascii.b2a_base64(sealed, newline=False).decode("ascii")},
            max_size=protocol.MAX_RELEASED)
    except ProtocolError:
        raise ProtocolError(protocol.E_TOO_LARGE, f"the {len(revealed)} secret(s) of "
                            f"{app}/{env} take {len(plaintext)} bytes, more than a "
                            "command's environment can hold; name fewer with "
                            "--secrets") from None
    names = sorted(revealed)
    state.record("released", f"released {len(names)} secret(s) of {app}/{env} to "
                 f"uid {peer.uid} for {req['argv0']}", request_id=request_id,
                 app=app, env=env, secrets=names,
                 versions=[f"{name}={revealed[name][0]}" for name in names],
                 command=req["argv0"], policy_rule=decision.rule, **peer.fields())
    state.consumers.record(peer, app, env, {name: revealed[name][0] for name in names})
    revealed.clear()
    state.count("released")
    return frame

