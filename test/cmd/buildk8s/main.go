// Command buildk8s builds the test tools of the nested module test/k8stools
// (kube-apiserver, etcd, cnitool) into .cache/bin ahead of the tests: the
// first build takes about ten minutes on two cores and should be its own
// step, not part of a test's timeout.
package main

import (
	"fmt"
	"os"

	"github.com/ferrymesh/ferry/test/testbed"
)

func main() {
	cnitool, err := testbed.CNITool()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	apiserver, etcd, err := testbed.KubeBinaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("%s\n%s\n%s\n", cnitool, etcd, apiserver)
}
