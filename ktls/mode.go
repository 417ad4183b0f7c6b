package ktls

import (
	"context"
	"fmt"
)

// Mode is the -ktls setting: whether ferry offers kernel TLS to ferry
// peers.
type Mode int

const (
	// Auto uses kernel TLS when the start-up probe passes, else user space.
	Auto Mode = iota
	// Off never offers it.
	Off
	// Required refuses to start without it; ferry then also refuses
	// mTLS sessions that do not end up in the kernel (proxy.KTLS).
	Required
)

// ParseMode parses "auto", "off" or "required".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "auto":
		return Auto, nil
	case "off":
		return Off, nil
	case "required":
		return Required, nil
	}
	return Auto, fmt.Errorf("ktls: mode %q: want auto, off or required", s)
}

func (m Mode) String() string {
	switch m {
	case Off:
		return "off"
	case Required:
		return "required"
	}
	return "auto"
}

// Decide runs the start-up check for mode m: whether to offer kernel TLS,
// and why not (reason, for a log line). err is set only for Required when
// kernel TLS is unusable.
func Decide(ctx context.Context, m Mode) (use bool, reason, err error) {
	if m == Off {
		return false, fmt.Errorf("ktls: off by configuration"), nil
	}
	if perr := Probe(ctx); perr != nil {
		if m == Required {
			return false, perr, fmt.Errorf("-ktls=required: %w (load the tls module on the node: modprobe tls)", perr)
		}
		return false, perr, nil
	}
	return true, nil, nil
}
