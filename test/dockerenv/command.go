package dockerenv

import (
	"context"
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
