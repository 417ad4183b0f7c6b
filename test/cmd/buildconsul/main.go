// Command buildconsul builds the test agent (Consul v1.14.11 from the tools
// module) into .cache/bin/consul ahead of the tests, so its first, slow build
// shows up as its own step instead of inside a test's timeout.
package main

import (
	"fmt"
	"os"

	"github.com/ferrymesh/ferry/test/testbed"
)

func main() {
	p, err := testbed.Consul()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cmd, err := testbed.Command(p, "version")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := cmd.Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "consul version:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %s", p, firstLine(out))
}

func firstLine(b []byte) string {
	for i, c := range b {
		if c == '\n' {
			return string(b[:i+1])
		}
	}
	return string(b) + "\n"
}
