//go:build kovnharness && kovnpatched

// kube-ovn-ebpf's harness (see zz_kovn_harness.go): the patched build takes the flag of
// contrib/kube-ovn's patch and checks it as the patched kube-ovn-cni does.

package daemon

func harnessConfigure(config *Configuration, opts HarnessOptions) error {
	config.PreroutingDatapath = opts.PreroutingDatapath
	if config.PreroutingDatapath == "" {
		config.PreroutingDatapath = PreroutingDatapathIPTables
	}
	return validatePreroutingDatapath(config.PreroutingDatapath)
}
