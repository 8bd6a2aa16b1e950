//go:build kovnharness && !kovnpatched

// kube-ovn-ebpf's harness (see zz_kovn_harness.go): a release build has no hand-over switch.

package daemon

import "errors"

func harnessConfigure(_ *Configuration, opts HarnessOptions) error {
	if opts.PreroutingDatapath != "" {
		return errors.New("--prerouting-datapath needs the patched build (contrib/kube-ovn)")
	}
	return nil
}
