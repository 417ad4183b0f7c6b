package dockerenv

import (
	"context"
	"os"
	"os/exec"

	"github.com/ferrymesh/ferry/test/testbed"
)

// command is exec.CommandContext for a program on the testbed's list
// (test/testbed/programs.txt, which deps.sh installs); an unlisted or
// missing program makes the command fail at Start with the list's message.
func command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd, err := testbed.CommandContext(ctx, name, args...)
	if err != nil {
		return &exec.Cmd{Path: name, Args: append([]string{name}, args...), Err: err}
	}
	return cmd
}

// MachineCache is where the engine's data root (image layers) and the
// debootstrap base images live: FERRY_MACHINE_CACHE, else
// /var/cache/ferry. Unlike .cache/ (one per clone, like Consul's binary,
// which a warm Go build cache rebuilds in seconds), these take minutes to
// make and nothing rebuilds them faster, so every clone on the machine
// shares them, as every clone shares Go's build cache.
func MachineCache() string {
	if d := os.Getenv("FERRY_MACHINE_CACHE"); d != "" {
		return d
	}
	return "/var/cache/ferry"
}
