package main

import "io"

func runRedirect(args []string, stdout, stderr io.Writer) error {
	return notImplemented("redirect")
}
